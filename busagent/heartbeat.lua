-- Write a worker's registry record unless others declared it dead (and moved its agents):
-- a worker that was only frozen must then stop instead of coming back as a second owner.
-- Called by busagent/scripts.py:heartbeat, the only code that knows this KEYS/ARGV order.
-- KEYS[1] servers hash. ARGV: name, record JSON. Returns 1 written, 0 fenced.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and cjson.decode(cur)['status'] == 'dead' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
