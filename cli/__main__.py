from busagent.cli import main

main()
