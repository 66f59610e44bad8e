-- Route calls to the inboxes of the servers that host their agents, atomically with the lookup,
-- so a call never lands in the inbox of a server the agent has left. When the agent or its server
-- is unknown the error reply is written at once: the caller gets a clear error, never a hang.
--
-- One body goes to one agent (a plain call) or to many (a fan-out: a shard asking its 10,000
-- participants costs one script call per thousand calls, and the body travels once).
--
-- Idempotent: a call sent twice (a send retried after its connection broke, when the first
-- attempt may have landed) is routed once; its sent mark remembers the call id for 30 s, longer
-- than a sender keeps resending (SEND_PATIENCE).
--
-- Keys are derived from the prefixes and the agent's record: busagent targets a single Redis (or
-- a primary with replicas), not Redis Cluster.
--
-- KEYS[1] agents hash, KEYS[2] servers hash.
-- ARGV: inbox prefix, reply prefix, sent prefix, reply ttl, version, caller, kind, body, calls
-- calls: msgpack array of {call id, agent id, signature}
local calls = cmsgpack.unpack(ARGV[9])
local ttl = tonumber(ARGV[4])
local live = {}
local routed = 0
for _, c in ipairs(calls) do
  local call, agent, sig = c[1], c[2], c[3]
  if redis.call('SET', ARGV[3] .. call, '1', 'NX', 'EX', 30) then
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
          redis.call('XADD', ARGV[1] .. server, '*', 'v', ARGV[5], 'call', call, 'agent', agent,
            'caller', ARGV[6], 'kind', ARGV[7], 'body', ARGV[8], 'sig', sig)
        else
          redis.call('XADD', ARGV[1] .. server, '*', 'v', ARGV[5], 'call', call, 'agent', agent,
            'caller', ARGV[6], 'kind', ARGV[7], 'body', ARGV[8])
        end
        routed = routed + 1
      else
        emsg = 'agent ' .. agent .. ' lived on server ' .. server .. ', which is gone; '
          .. 'create the agent again (see `busagent servers`)'
      end
    end
    if emsg then
      local rk = ARGV[2] .. call
      redis.call('RPUSH', rk, cmsgpack.pack({ok = false, error = {type = 'UnknownAgent',
        message = emsg}}))
      redis.call('EXPIRE', rk, ttl)
    end
  end
end
return routed
