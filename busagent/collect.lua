-- Read many replies in one step: each call's reply, or false while it is not there. Gathering
-- 10,000 placeholders costs five script calls instead of ten thousand LINDEX commands to encode
-- and parse. With ARGV[2] = 1 each reply read is deleted: the caller is its only reader (a
-- shard gathering its participants), so a round of a million calls leaves nothing behind.
-- Keys are derived (single Redis, not Cluster).
-- ARGV[1] reply prefix, ARGV[2] take (1) or peek (0), ARGV[3..] call ids.
local take = ARGV[2] == '1'
local out = {}
for i = 3, #ARGV do
  local k = ARGV[1] .. ARGV[i]
  local v = redis.call('LINDEX', k, 0)
  if v and take then redis.call('DEL', k) end
  out[i - 2] = v
end
return out
