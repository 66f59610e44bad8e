-- Commit a batch of finished calls atomically: for each, acknowledge and delete the inbox entry,
-- write the reply (a one-element list with a TTL) and apply the agent's memory changes.
-- A script rather than MULTI because one argument carries the whole batch (msgpack), which
-- costs the worker far less to encode than thousands of separate commands.
--
-- Fencing: a call whose entry is no longer pending here (recovery moved it to another worker
-- while this one was presumed dead) is skipped whole, so its reply is written once, by the
-- worker that owns it, and the memory never gets a second copy of its changes.
--
-- KEYS[1] the inbox stream, KEYS[2] the agents hash, KEYS[3] the specs hash.
-- ARGV: group, reply ttl, reply key prefix, memory key prefix, batch.
-- batch: array of {entry id, call id, reply, agent id, op, new memory items...}
--   op: 0 nothing, 1 memory cleared first, 2 agent gone (drop memory, record and spec)
local recs = cmsgpack.unpack(ARGV[5])
local ttl = tonumber(ARGV[2])
local fenced = 0
for _, r in ipairs(recs) do
  if redis.call('XACK', KEYS[1], ARGV[1], r[1]) == 0 then
    fenced = fenced + 1
  else
    redis.call('XDEL', KEYS[1], r[1])
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
        redis.call('HDEL', KEYS[3], r[4])
      else
        if r[5] == 1 then redis.call('DEL', mk) end
        if #r > 5 then redis.call('RPUSH', mk, unpack(r, 6)) end
      end
    end
  end
end
return fenced
