-- Create a named agent: reserve its name in its namespace and write its record, spec and create
-- entry in one atomic step, so of many processes racing for one name exactly one creates an agent
-- and the others learn the winner. A name whose agent's record is gone (deleted, swept) is free.
-- Called by busagent/scripts.py:create_named, the only code that knows this KEYS/ARGV order.
-- KEYS: names hash of the namespace, agents hash, specs hash, the server's inbox, the owner's
-- owned set (ignored when ARGV[5] is '').
-- ARGV: name, agent id, record JSON, spec, owner ('' detached), then the entry's fields, flat.
-- Returns {1} created, or {0, winner's id, winner's record JSON}.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local rec = redis.call('HGET', KEYS[2], cur)
  if rec then return {0, cur, rec} end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
if ARGV[5] ~= '' then redis.call('SADD', KEYS[5], ARGV[2]) end
redis.call('XADD', KEYS[4], '*', unpack(ARGV, 6))
return {1}
