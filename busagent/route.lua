-- Route one call to the inbox of the server that hosts its agent, atomically with the lookup,
-- so a call never lands in the inbox of a server the agent has left. When the agent or its server
-- is unknown the error reply is written at once: the caller gets a clear error, never a hang.
--
-- Idempotent: a call sent twice (a send retried after its connection broke, when the first
-- attempt may have landed) is routed once; KEYS[4] remembers the call id for 30 s, longer
-- than a sender keeps resending (SEND_PATIENCE).
--
-- KEYS[1] agents hash, KEYS[2] servers hash, KEYS[3] the call's reply key, KEYS[4] its sent mark.
-- The inbox key is derived from the agent's record (ARGV[1] .. server): busagent targets a single
-- Redis (or a primary with replicas), not Redis Cluster.
-- ARGV: inbox prefix, reply ttl, version, call id, agent id, caller, kind, body, signature
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', 30) then return 2 end
local rec = redis.call('HGET', KEYS[1], ARGV[5])
local etype, emsg
if not rec then
  etype = 'UnknownAgent'
  emsg = 'agent ' .. ARGV[5] .. ' is not registered (deleted, or never created); '
    .. 'list agents with `busagent agents`'
else
  local server = cjson.decode(rec)['server']
  if redis.call('HEXISTS', KEYS[2], server) == 1 then
    if ARGV[9] ~= '' then
      redis.call('XADD', ARGV[1] .. server, '*', 'v', ARGV[3], 'call', ARGV[4], 'agent', ARGV[5],
        'caller', ARGV[6], 'kind', ARGV[7], 'body', ARGV[8], 'sig', ARGV[9])
    else
      redis.call('XADD', ARGV[1] .. server, '*', 'v', ARGV[3], 'call', ARGV[4], 'agent', ARGV[5],
        'caller', ARGV[6], 'kind', ARGV[7], 'body', ARGV[8])
    end
    return 1
  end
  etype = 'UnknownAgent'
  emsg = 'agent ' .. ARGV[5] .. ' lived on server ' .. server .. ', which is gone; '
    .. 'create the agent again (see `busagent servers`)'
end
redis.call('RPUSH', KEYS[3], cmsgpack.pack({ok = false, error = {type = etype, message = emsg}}))
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 0
