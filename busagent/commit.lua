-- Commit a batch of finished calls atomically: for each, write the reply (a one-element list
-- with a TTL), apply the agent's memory changes, and acknowledge and delete the inbox entry.
-- A script rather than MULTI because one argument carries the whole batch (msgpack), which
-- costs the worker far less to encode than thousands of separate commands.
--
-- KEYS[1] the inbox stream, KEYS[2] the agents hash.
-- ARGV: group, reply ttl, reply key prefix, memory key prefix, batch.
-- batch: array of {entry id, call id, reply, agent id, op, new memory items...}
--   op: 0 nothing, 1 memory cleared first, 2 agent gone (drop memory and registry record)
local recs = cmsgpack.unpack(ARGV[5])
local ttl = tonumber(ARGV[2])
local ids = {}
for i, r in ipairs(recs) do
  ids[i] = r[1]
  if r[2] ~= '' and r[3] ~= '' then
    local rk = ARGV[3] .. r[2]
    redis.call('RPUSH', rk, r[3])
    redis.call('EXPIRE', rk, ttl)
  end
  if r[4] ~= '' then
    local mk = ARGV[4] .. r[4]
    if r[5] == 2 then
      redis.call('DEL', mk)
      redis.call('HDEL', KEYS[2], r[4])
    else
      if r[5] == 1 then redis.call('DEL', mk) end
      if #r > 5 then redis.call('RPUSH', mk, unpack(r, 6)) end
    end
  end
end
for i = 1, #ids, 1000 do
  local chunk = {unpack(ids, i, math.min(i + 999, #ids))}
  redis.call('XACK', KEYS[1], ARGV[1], unpack(chunk))
  redis.call('XDEL', KEYS[1], unpack(chunk))
end
return #recs
