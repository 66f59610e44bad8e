-- Peek at many replies in one step: each call's reply (or false while it is not there).
-- Gathering 10,000 placeholders costs ten script calls instead of ten thousand LINDEX commands
-- to encode and parse. Keys are derived (single Redis, not Cluster).
-- ARGV[1] reply prefix, ARGV[2..] call ids.
local out = {}
for i = 2, #ARGV do
  out[i - 1] = redis.call('LINDEX', ARGV[1] .. ARGV[i], 0)
end
return out
