-- Route calls to the inboxes of the servers that host their agents, atomically with the lookup,
-- so a call never lands in the inbox of a server the agent has left. When the agent or its server
-- is unknown the error reply is written at once: the caller gets a clear error, never a hang.
--
-- One body goes to one agent (a plain call) or to many (a fan-out: a shard asking its 10,000
-- participants costs one script call per thousand calls, and the body travels once).
--
-- Idempotent: a call sent twice (a send retried after its connection broke, when the first
-- attempt may have landed) is routed once; its sent mark remembers the call id for ARGV[3]
-- seconds (tuning.SENT_MARK_TTL), longer than a sender keeps resending (SEND_PATIENCE).
--
-- The inbox key is derived from the prefix and the agent's record (the one key not in KEYS:
-- see busagent/scripts.py). The entry's fields are those of busagent.protocol.Entry.
--
-- Called by busagent/scripts.py:route, the only code that knows this KEYS/ARGV order.
-- KEYS[1] agents hash, KEYS[2] servers hash, KEYS[3 .. 2+n] the calls' sent marks,
--   KEYS[3+n .. 2+2n] their reply keys (n calls).
-- ARGV: inbox prefix, reply ttl, sent mark ttl, version, caller, kind, body, calls
-- calls: msgpack array of {call id, agent id, signature}
local calls = cmsgpack.unpack(ARGV[8])
local n = #calls
local ttl = tonumber(ARGV[2])
local live = {}
local routed = 0
for i, c in ipairs(calls) do
  local call, agent, sig = c[1], c[2], c[3]
  if redis.call('SET', KEYS[2 + i], '1', 'NX', 'EX', ARGV[3]) then
    local rec = redis.call('HGET', KEYS[1], agent)
    local emsg
    if not rec then
      emsg = 'agent ' .. agent .. ' is not registered (deleted, or never created); '
        .. 'list agents with `busagent agents`'
    else
      local server = cjson.decode(rec)['server']
      if live[server] == nil then live[server] = redis.call('HEXISTS', KEYS[2], server) == 1 end
      if live[server] then
        if sig ~= '' then
          redis.call('XADD', ARGV[1] .. server, '*', 'v', ARGV[4], 'call', call, 'agent', agent,
            'caller', ARGV[5], 'kind', ARGV[6], 'body', ARGV[7], 'sig', sig)
        else
          redis.call('XADD', ARGV[1] .. server, '*', 'v', ARGV[4], 'call', call, 'agent', agent,
            'caller', ARGV[5], 'kind', ARGV[6], 'body', ARGV[7])
        end
        routed = routed + 1
      else
        emsg = 'agent ' .. agent .. ' lived on server ' .. server .. ', which is gone; '
          .. 'create the agent again (see `busagent servers`)'
      end
    end
    if emsg then
      local rk = KEYS[2 + n + i]
      redis.call('RPUSH', rk, cmsgpack.pack({ok = false, error = {type = 'UnknownAgent',
        message = emsg}}))
      redis.call('EXPIRE', rk, ttl)
    end
  end
end
return routed
