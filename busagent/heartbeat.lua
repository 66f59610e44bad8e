-- Write a worker's registry record unless others declared it dead (and moved its agents):
-- a worker that was only frozen must then stop instead of coming back as a second owner.
-- The record's "heartbeat" is stamped here with Redis's own TIME, so liveness never compares
-- two hosts' clocks (busagent/records.py).
-- Called by busagent/scripts.py:heartbeat, the only code that knows this KEYS/ARGV order.
-- KEYS[1] servers hash. ARGV: name, record JSON without "heartbeat" (an object: starts with
-- '{'), adopt ('1': write even over a dead record, the name's new owner registering).
-- Returns {1 written or 0 fenced, the Redis time as "seconds.micros"}.
redis.replicate_commands()  -- TIME before a write: replicate effects (implied from Redis 7)
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
if ARGV[3] ~= '1' then
  local cur = redis.call('HGET', KEYS[1], ARGV[1])
  if cur and cjson.decode(cur)['status'] == 'dead' then return {0, now} end
end
redis.call('HSET', KEYS[1], ARGV[1], '{"heartbeat":' .. now .. ',' .. string.sub(ARGV[2], 2))
return {1, now}
