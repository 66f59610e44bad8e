-- Read many replies in one step: each call's reply, or false while it is not there. Gathering
-- 10,000 placeholders costs five script calls instead of ten thousand LINDEX commands to encode
-- and parse. With ARGV[1] = 1 each reply read is deleted: the caller is its only reader (a
-- shard gathering its participants), so a round of a million calls leaves nothing behind.
-- ARGV[2] bounds the answer in bytes as well as in count: once the values taken add up to it,
-- later replies come back false (still pending: the caller reads them next time), so that a
-- batch never outgrows the connection's output buffer (client-output-buffer-limit). The first
-- reply found always comes back, whatever its size. With ARGV[1] = 2 nothing is read: each
-- reply's size in bytes comes back (0 while it is not there), to find one too big to send.
-- Only LINDEX and DEL: it runs while Redis refuses writes for want of memory.
-- Called by busagent/scripts.py:collect, the only code that knows this KEYS/ARGV order.
-- KEYS: the reply keys. ARGV[1] take (1), peek (0) or sizes (2); ARGV[2] byte budget.
local mode = ARGV[1]
local budget = tonumber(ARGV[2])
local used = 0
local out = {}
for i = 1, #KEYS do
  local v = redis.call('LINDEX', KEYS[i], 0)
  if mode == '2' then
    out[i] = v and #v or 0
  elseif v and (used == 0 or used + #v <= budget) then
    used = used + #v
    if mode == '1' then redis.call('DEL', KEYS[i]) end
    out[i] = v
  else
    out[i] = false
  end
end
return out
