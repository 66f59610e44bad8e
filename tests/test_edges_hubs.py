"""Issue 10, items 20-24: hubs and configs, and what ModelScope-Agent's multi-agent tests and
demos expect of the task center (speakers, senders, memory of a conversation, human answers).
Real workers and a real redis-server; the agents are in tests/hub_agents.py."""

from __future__ import annotations

from typing import Any

import pytest

import busagent
from busagent import DistConf, Hub, Human, Msg, TaskCenter
from busagent.errors import BusagentError, ConfigError
from busagent.hub import HubMessage, Member, seq_key

from .agents import Adder
from .conftest import Workers, wait_for
from .hub_agents import Keeper, ModelUser, Speaker

AGENTS = "tests.hub_agents"


def kept(agent: Any) -> list[list[Any]]:
    """``[seq, sent_from, content]`` of what the agent's memory holds, after every call sent
    to it so far (its mailbox runs them in order)."""
    if isinstance(agent, busagent.RemoteAgent):
        return list(agent.kept().result(timeout=20))
    return list(agent.kept())


def expected(hub: Hub, member: Member) -> list[list[Any]]:
    """What a member should hold: what it heard and what it said, in hub order."""
    return [[h.seq, h.sent_from, h.msg.content] for h in hub.history() if h.kept_by(member)]


def ends(events: list[Any]) -> list[str]:
    return sorted(e.role for e in events if e.type == "end")


# --- item 20: hubs and configs -------------------------------------------------------------


def test_leave_right_after_publish_keeps_what_was_published(workers: Workers, raw: Any,
                                                           bus: Any) -> None:
    workers.start("w1", AGENTS)
    hub = Hub("leave")
    gone = Speaker("gone", to_dist=DistConf(server="w1")).ready()
    stays = Speaker("stays", to_dist=DistConf(server="w1")).ready()
    local = Speaker("local")
    for a in (gone, stays, local):
        hub.join(a)
    busy = gone.hold(0.5)  # its worker reads the notices below only after the leave
    for i in range(5):
        hub.publish(Msg("user", f"before-{i}"))
    hub.leave(gone)
    hub.leave(local)
    hub.publish(Msg("user", "after"))
    busy.result(timeout=20)
    assert [c for _, _, c in kept(gone)] == [f"before-{i}" for i in range(5)]
    assert [c for _, _, c in kept(local)] == [f"before-{i}" for i in range(5)]
    wait_for(lambda: len(kept(stays)) == 6, 20, "the member that stayed heard all six")
    # nothing of the members that left remains in the hub
    fields = set(raw.hkeys(bus.keys.members("leave")))
    assert not [f for f in fields if gone.agent_id in f or local.agent_id in f], fields

    # it can come back, from now on
    hub.join(gone, history=False)
    hub.publish(Msg("user", "welcome back"))
    assert [c for _, _, c in kept(gone)][-1] == "welcome back"
    assert len(kept(gone)) == 6


def test_agentscope_openai_chat_config_without_base_url(workers: Workers,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from busagent.fakellm import FakeLLM
    from busagent.models import ModelConfig, OpenAIChatModel

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # AgentScope's own sample config: no base_url means the vendor's endpoint
    agentscope = {"config_name": "gpt-4", "model_type": "openai_chat", "model_name": "gpt-4",
                  "api_key": "sk-test", "client_args": {"organization": "org-1"},
                  "generate_args": {"temperature": 0.5}}
    m = OpenAIChatModel(ModelConfig.model_validate(agentscope))
    assert m.url == "https://api.openai.com/v1/chat/completions"
    assert m.headers["Authorization"] == "Bearer sk-test"
    assert m.headers["OpenAI-Organization"] == "org-1"
    for model_type in ("openai", "openai_chat"):
        cfg = {**agentscope, "model_type": model_type}
        busagent.load_model_configs(cfg)  # accepted
    # vllm has no vendor: still refused, in one line, saying what to set
    with pytest.raises(ConfigError, match="base_url") as e:
        OpenAIChatModel(ModelConfig.model_validate({**agentscope, "model_type": "vllm"}))
    assert "\n" not in str(e.value)

    # On a worker whose environment names the endpoint (as the openai SDK reads it), the same
    # config without base_url reaches it.
    fake = FakeLLM().start()
    try:
        workers.start("w1", AGENTS, env={"OPENAI_BASE_URL": fake.url,
                                         "OPENAI_API_KEY": "sk-env"})
        busagent.load_model_configs({**agentscope, "config_name": "vendor", "model_name": "x"})
        user = ModelUser("asker", "vendor", to_dist=DistConf(server="w1"))
        text = user(None).result(timeout=30)
        assert isinstance(text, str) and text
        assert fake.requests >= 1
    finally:
        fake.stop()


@pytest.mark.parametrize("to_dist", [
    {"host": "localhost", "port": 12010},
    {"host": "10.0.0.2", "port": 12010, "max_pool_size": 8192, "lazy_launch": False},
    {"port": 12010},
    {"server": 5},
    {"server": ""},
    {"servr": "w1"},
    {1: "w1"},
    "w1",
    3,
    ["w1"],
])
def test_to_dist_agentscope_dicts_and_other_invalid_input(bus: Any, to_dist: Any) -> None:
    with pytest.raises(BusagentError) as e:
        Adder("a", to_dist=to_dist)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg
    assert "DistConf(server=" in msg and "to_dist=True" in msg
    if isinstance(to_dist, dict) and "host" in to_dist:
        assert "host" in msg and "by name" in msg
    local = Adder("b")
    with pytest.raises(ConfigError, match="DistConf"):
        local.to_dist(to_dist=to_dist)
    with pytest.raises(ConfigError, match="DistConf"):
        if isinstance(to_dist, dict) and all(isinstance(k, str) for k in to_dist):
            DistConf(**to_dist)
        else:
            DistConf.of(to_dist)


def test_to_dist_agentscope_keywords(bus: Any) -> None:
    local = Adder("b")
    with pytest.raises(ConfigError, match=r"host, port.*by name"):
        local.to_dist(host="localhost", port=12010)
    with pytest.raises(ConfigError, match="server 7"):
        local.to_dist(server=7)  # type: ignore[arg-type]


# --- item 21: choosing speakers -----------------------------------------------------------


def test_allowed_roles_speak_and_are_whole_names(workers: Workers) -> None:
    workers.start("w1", AGENTS)
    one = Speaker("alice", to_dist=DistConf(server="w1")).ready()
    ten = Speaker("bob", to_dist=DistConf(server="w1")).ready()
    log = Speaker("log", to_dist=DistConf(server="w1")).ready()
    local = Speaker("carol")
    center = TaskCenter("allowed", deadline=20)
    center.add_agents([one, ten, local], roles=["role_play1", "role_play10", "donald_trump"])
    center.add_agents([log], roles=["log"], watcher=True)

    # nobody was notified: a plain step says so instead of an empty silence
    events = list(center.step())
    assert [(e.type, e.role) for e in events] == [("skipped", "")]
    assert "nobody to speak" in str(events[0].data)

    # ModelScope: the allowed roles speak, notified or not (local and distributed alike)
    assert ends(list(center.step(allowed_roles=["donald_trump"]))) == ["donald_trump"]
    assert ends(list(center.step(allowed_roles=["role_play10"]))) == ["role_play10"]
    # a string is one role, never a substring of another
    assert ends(list(center.step(allowed_roles="role_play10"))) == ["role_play10"]
    assert ends(list(center.step(allowed_roles="role_play1"))) == ["role_play1"]
    assert ends(list(center.step(allowed_roles=("role_play1", "donald_trump")))) == [
        "donald_trump", "role_play1"]

    # a role that cannot speak is refused before anything runs, saying why
    with pytest.raises(ConfigError, match="watcher"):
        list(center.step(allowed_roles=["log"]))
    with pytest.raises(ConfigError, match="watcher"):
        list(center.step(speakers="log"))
    events = list(center.step(speakers=lambda c, ms: ["log"]))  # a chooser naming a watcher
    assert [e.type for e in events] == ["skipped"] and "log" in str(events[0].data)
    with pytest.raises(ConfigError, match="role_play"):  # lists the roles there are
        list(center.step(allowed_roles="role_play"))
    for bad in (5, [None], [""], {"role_play1": 1}):
        with pytest.raises(ConfigError, match="allowed_roles"):
            list(center.step(allowed_roles=bad))  # type: ignore[arg-type]
    # ModelScope's default, []: no restriction, the notified members speak
    notified = sorted(m.role for m in center.notified())
    assert notified and ends(list(center.step(allowed_roles=[]))) == notified

    # a chooser that names nobody, or nobody allowed: the step says why
    events = list(center.step(speakers=lambda c, ms: ["ghost"]))
    assert [e.type for e in events] == ["skipped"] and "ghost" in str(events[0].data)
    events = list(center.step(speakers=["role_play1"], allowed_roles=["role_play10"]))
    assert [e.type for e in events] == ["skipped"] and "allowed_roles" in str(events[0].data)


# --- item 22: who a message is from and for -----------------------------------------------


def test_send_from_is_matched_by_role(workers: Workers) -> None:
    workers.start("w1", AGENTS)
    alice = Speaker("alice", to_dist=DistConf(server="w1")).ready()
    bob = Speaker("bob", to_dist=DistConf(server="w1")).ready()
    center = TaskCenter("sendfrom", deadline=20)
    ma, mb = center.add_agents([alice, bob], roles=["writer", "critic"])
    center.send_task_request("a draft", send_from="writer")
    first = center.hub.history()[0]
    assert first.sender == alice.agent_id and first.sent_from == "alice"
    # the writer is not notified by its own line: only the critic speaks
    assert [m.role for m in center.notified()] == ["critic"]
    assert ends(list(center.step())) == ["critic"]
    # the same in a plain publish, and a role two members share is refused, not guessed
    seq = center.hub.publish(Msg("alice", "more"), sent_from="writer")
    assert center.hub.history(seq)[0].sender == alice.agent_id
    carol = Speaker("carol")
    center.hub.join(carol, role="critic")
    with pytest.raises(ConfigError, match="role of"):
        center.hub.publish(Msg("x", "y"), sent_from="critic")
    assert ma.id == alice.agent_id and mb.id == bob.agent_id


def test_step_task_goes_to_the_speakers_only(workers: Workers) -> None:
    workers.start("w1", AGENTS)
    agents = [Speaker(n, to_dist=DistConf(server="w1")).ready() for n in ("a", "b")]
    center = TaskCenter("task", deadline=20)
    center.add_agents([*agents, Speaker("c")], roles=["writer", "critic", "editor"])
    center.send_task_request("first", send_to="critic")
    events = list(center.step(task="and keep it short"))
    assert ends(events) == ["critic"]  # not every role
    extra = [h for h in center.hub.history() if h.msg.content == "and keep it short"]
    assert len(extra) == 1 and extra[0].send_to == [agents[1].agent_id]
    assert "and keep it short" in [c for _, _, c in kept(agents[1])]
    assert "and keep it short" not in [c for _, _, c in kept(agents[0])]
    # with nobody to speak, the task is not published and the step says so
    quiet = TaskCenter("task-quiet", deadline=20)
    quiet.add_agents([Speaker("d")])
    events = list(quiet.step(task="lost?"))
    assert [e.type for e in events] == ["skipped"]
    assert "task was not published" in str(events[0].data)
    assert quiet.hub.history() == []


def test_default_send_from_reaches_a_human_named_user(workers: Workers) -> None:
    workers.start("w1", AGENTS)
    bot = Speaker("bot", to_dist=DistConf(server="w1")).ready()
    human = Human(mode="chatbot", timeout=5)  # named "user" by default
    center = TaskCenter("human-user", deadline=20)
    center.add_agents([bot, human], roles=["bot", "user"])
    center.send_task_request("hello everyone")
    first = center.hub.history()[0]
    assert first.sender == "" and first.sent_from == "user_requirement"
    assert sorted(m.role for m in center.notified()) == ["bot", "user"]
    assert [m.content for m in human.memory.get()] == ["hello everyone"]
    # explicitly from the human: then it is the human's own line
    center.send_task_request("from me", send_to="bot", send_from="user")
    assert center.hub.history()[-1].sender == human.agent_id


# --- item 23: memory of a conversation ----------------------------------------------------


def test_memory_holds_what_was_heard_and_said_in_hub_order(workers: Workers) -> None:
    workers.start("w1", AGENTS)
    workers.start("w2", AGENTS)
    writer = Speaker("wanda", to_dist=DistConf(server="w1")).ready()
    critic = Speaker("carl", to_dist=DistConf(server="w2")).ready()
    keeper = Keeper("kim", to_dist=DistConf(server="w1")).ready()
    local = Speaker("lou")
    center = TaskCenter("memory", deadline=20)
    members = center.add_agents([writer, critic, keeper, local],
                                roles=["writer", "critic", "keeper", "local"])
    center.send_task_request("topic", send_to="critic", send_from="writer")
    for _ in range(2):
        list(center.step(round=2))
    history = center.hub.history()
    assert len({h.sender for h in history}) == 4  # everyone spoke
    for agent, m in zip([writer, critic, keeper, local], members, strict=True):
        want = expected(center.hub, m)
        assert any(h.sender == m.id for h in history if [h.seq, h.sent_from, h.msg.content]
                   in want)
        got = [x for x in kept(agent) if x[0] is not None]  # what the hub gave it
        if agent is keeper:  # it keeps its own lines itself: not given twice
            own = {h.seq for h in history if h.sender == m.id}
            want = [w for w in want if w[0] not in own]
            lines = [c for _, _, c in kept(agent)]
            assert len(lines) == len(set(lines))
        assert got == want, agent.name
    # the task's sender has the task, as its own line
    assert kept(writer)[0][2] == "topic"


def test_chat_room_roles_remember_what_they_said(workers: Workers,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys

    from .conftest import ROOT

    path = ROOT / "examples" / "chat_room" / "agents.py"
    workers.start("w1", str(path))
    # the example's module as its worker names it (after the file), so its class can be sent
    spec = importlib.util.spec_from_file_location("agents", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "agents", mod)
    spec.loader.exec_module(mod)
    busagent.load_model_configs({"config_name": "lines", "model_type": "scripted",
                                 "lines": ["{name} speaks"]})
    ann = mod.Role("ann", "a poet", "lines", to_dist=DistConf(server="w1")).ready()
    ben = mod.Role("ben", "a critic", "lines", to_dist=DistConf(server="w1")).ready()
    center = TaskCenter("room-memory", deadline=20)
    center.add_agents([ann, ben], roles=["poet", "critic"])
    center.send_task_request("a topic", send_from="host")
    assert ends(list(center.step(speakers="poet"))) == ["poet"]
    assert ends(list(center.step(speakers="critic"))) == ["critic"]
    for agent in (ann, ben):
        want = ["a topic", "ann speaks", "ben speaks"]
        wait_for(lambda a=agent, w=want: [m.content for m in a.memory.get()] == w, 20,
                 f"{agent.name} remembers what it heard and said, in hub order")


# --- item 24: human answers ---------------------------------------------------------------


def test_user_response_applies_to_its_step_or_is_refused(workers: Workers) -> None:
    workers.start("w1", AGENTS)
    bot = Speaker("bot", to_dist=DistConf(server="w1")).ready()
    you = Human("you", mode="chatbot", timeout=0.3)
    center = TaskCenter("answers", deadline=20)
    center.add_agents([bot, you], roles=["bot", "you"])
    center.send_task_request("hi", send_to="bot")

    # the human does not speak in this step: the answer is dropped, visibly
    events = list(center.step(user_response="stale"))
    assert ends(events) == ["bot"]
    refused = [e for e in events if e.role == "you"]
    assert [e.type for e in refused] == ["skipped"] and "not used" in str(refused[0].data)
    # next step the human speaks, without an answer: it is skipped, never given "stale"
    events = list(center.step())
    assert "you" in {e.role for e in events} and "you" not in ends(events)
    assert "stale" not in [h.msg.content for h in center.hub.history()]
    # an answer given to the step where the human speaks is said then
    list(center.step(allowed_roles="bot"))
    events = list(center.step(user_response="fresh"))
    assert "you" in ends(events)
    assert [h.msg.content for h in center.hub.history()].count("fresh") == 1
    # a hub with no human to answer: refused at once
    center2 = TaskCenter("no-human", deadline=20)
    center2.add_agents([Speaker("solo")])
    with pytest.raises(ConfigError, match="no Human"):
        list(center2.step(user_response="anyone?"))


def test_kept_by_covers_own_lines() -> None:
    m = Member(id="a1", name="a", role="writer")
    own = HubMessage(hub="h", seq="1-0", sent_from="a", sender="a1", send_to=["*"],
                     msg=Msg("a", "x"))
    assert own.kept_by(m) and not own.to(m)


def test_an_agent_that_keeps_its_own_reply_has_it_in_hub_order(workers: Workers) -> None:
    """AgentScope's habit (``self.memory.add(m); return m``) with parallel speakers: another's
    line published before the keeper's own reaches it after it replied; once its own line is
    delivered, its memory holds the lines in hub order (its reply after the earlier line)."""
    workers.start("w1", AGENTS)
    keeper = Keeper("kim", to_dist=DistConf(server="w1")).ready()
    other = Speaker("sam")
    hub = Hub(f"order-{keeper.agent_id}")
    hub.join(keeper)
    hub.join(other)
    task = hub.publish(Msg("user", "topic"))
    wait_for(lambda: [c for _, _, c in kept(keeper)] == ["topic"], what="the task observed")
    reply = keeper(Msg("user", "go")).result(30)  # kept in its memory by the keeper itself
    earlier = hub.publish(Msg("sam", "sam line 1"), sent_from=other)
    wait_for(lambda: len(kept(keeper)) == 3, what="sam's line observed")
    own = hub.publish(reply, sent_from=keeper)
    assert [s for s in (task, earlier, own)] == sorted((task, earlier, own), key=seq_key)
    want = ["topic", "sam line 1", "kim kept line 1"]
    wait_for(lambda: [c for _, _, c in kept(keeper)] == want, timeout=20,
             what=f"the keeper's memory in hub order ({kept(keeper)})")
    # still given once, and its rebuilt memory (what Redis holds) agrees
    assert [c for _, _, c in kept(keeper)] == want
    assert [m.content for m in keeper.memory.get() if isinstance(m, Msg)] == want
