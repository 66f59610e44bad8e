-- Read many replies in one step: each call's reply, or false while it is not there. Gathering
-- 10,000 placeholders costs five script calls instead of ten thousand LINDEX commands to encode
-- and parse. With ARGV[1] = 1 each reply read is deleted: the caller is its only reader (a
-- shard gathering its participants), so a round of a million calls leaves nothing behind.
-- Called by busagent/scripts.py:collect, the only code that knows this KEYS/ARGV order.
-- KEYS: the reply keys. ARGV[1] take (1) or peek (0).
local take = ARGV[1] == '1'
local out = {}
for i = 1, #KEYS do
  local v = redis.call('LINDEX', KEYS[i], 0)
  if v and take then redis.call('DEL', KEYS[i]) end
  out[i] = v
end
return out
