-- Commit a batch of finished calls atomically: for each, acknowledge and delete the inbox entry,
-- write the reply (a one-element list with a TTL) and apply the agent's memory changes and its
-- declared state (Agent.state_dict) when that changed.
-- A script rather than MULTI because one argument carries the whole batch (msgpack), which
-- costs the worker far less to encode than thousands of separate commands.
--
-- Fencing: a call whose entry is no longer pending here (recovery moved it to another worker
-- while this one was presumed dead) is skipped whole, so its reply is written once, by the
-- worker that owns it, and neither the memory nor the state gets a second copy of its changes.
-- Memory and state are written only for an agent still in the agents hash, so a deleted agent
-- leaves no key behind.
--
-- Called by busagent/scripts.py:commit, the only code that knows this KEYS/ARGV order.
-- KEYS[1] the inbox stream, KEYS[2] the agents hash, KEYS[3] the specs hash, then the reply,
--   memory and state keys the batch names by index.
-- ARGV: group, reply ttl, batch.
-- batch: array of {entry id, reply key index, reply, agent id, memory key index, op,
--                  state key index, state json, new memory items...}; an index of 0: no reply
--   to write, no memory change, or no state change
--   op: 0 nothing, 1 memory cleared first, 2 agent gone (drop memory, state, record and spec)
local recs = cmsgpack.unpack(ARGV[3])
local ttl = tonumber(ARGV[2])
local fenced = 0
for _, r in ipairs(recs) do
  if redis.call('XACK', KEYS[1], ARGV[1], r[1]) == 0 then
    fenced = fenced + 1
  else
    redis.call('XDEL', KEYS[1], r[1])
    if r[2] > 0 then
      local rk = KEYS[r[2]]
      redis.call('RPUSH', rk, r[3])
      redis.call('EXPIRE', rk, ttl)
    end
    if r[6] == 2 then
      if r[5] > 0 then redis.call('DEL', KEYS[r[5]]) end
      if r[7] > 0 then redis.call('DEL', KEYS[r[7]]) end
      redis.call('HDEL', KEYS[2], r[4])
      redis.call('HDEL', KEYS[3], r[4])
    elseif (r[5] > 0 or r[7] > 0) and redis.call('HEXISTS', KEYS[2], r[4]) == 1 then
      -- Only a registered agent's memory and state: a call that was running when its agent
      -- was deleted (delete_all_agent runs beside the agent's own mailbox) must not re-create
      -- the keys after the delete removed them.
      if r[5] > 0 then
        local mk = KEYS[r[5]]
        if r[6] == 1 then redis.call('DEL', mk) end
        if #r > 8 then redis.call('RPUSH', mk, unpack(r, 9)) end
      end
      if r[7] > 0 then redis.call('SET', KEYS[r[7]], r[8]) end
    end
  end
end
return fenced
