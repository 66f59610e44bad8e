-- Move a batch of agents off a dead (or draining) server, atomically: re-point their registry
-- records at their new servers, queue a restore for each (the new worker rebuilds the agent from
-- its spec and its memory as of the last completed call), and move every call still waiting in
-- the old inbox to the new one in stream order, counting the delivery. Because records change in
-- the same step as the calls move, a caller's later calls queue behind the moved ones.
--
-- A call that has now been delivered to max_deliveries workers that all died is not moved but
-- dead-lettered: its caller gets an error reply and the entry is kept in the dead-letter stream.
-- Entries nobody waits on (no call id: a restore, a wake) get no reply.
--
-- The reply keys of dead-lettered calls are derived from the prefix (the keys not in KEYS: see
-- busagent/scripts.py). Entry fields are those of busagent.protocol.Entry; the restore entries
-- come ready-made from Python.
--
-- Called by busagent/scripts.py:move, the only code that knows this KEYS/ARGV order.
-- KEYS[1] agents hash, KEYS[2] old inbox, KEYS[3] dead-letter stream, KEYS[4..] new inboxes.
-- ARGV: group, reply prefix, reply ttl, max deliveries, dead-letter max length,
--       old server name, snapshot end id, batch (msgpack), restarts (msgpack map: entry id ->
--       deaths of workers restarted under the old name while holding it)
-- batch: array of {agent id, new inbox KEYS index, record JSON, restore entry fields (flat),
--                  {snapshot entry ids...}}
local batch = cmsgpack.unpack(ARGV[8])
local restarts = cmsgpack.unpack(ARGV[9])
local maxd = tonumber(ARGV[4])
local moved, dead = 0, 0

local function move(id, fields, target)
  local f = {}
  local tries = 0
  for i = 1, #fields, 2 do
    if fields[i] == 'tries' then
      tries = tonumber(fields[i + 1])
    else
      f[#f + 1] = fields[i]
      f[#f + 1] = fields[i + 1]
    end
  end
  tries = tries + 1 + (restarts[id] or 0)
  redis.call('XACK', KEYS[2], ARGV[1], id)
  redis.call('XDEL', KEYS[2], id)
  local call, kind = '', ''
  for i = 1, #f, 2 do
    if f[i] == 'call' then call = f[i + 1] end
    if f[i] == 'kind' then kind = f[i + 1] end
  end
  if kind == 'restore' then
    -- A restore the dead worker never finished: the agent's new server gets a fresh one
    -- (below), so this one is dropped, not counted toward max_deliveries or dead-lettered.
    return
  end
  if tries >= maxd then
    -- The fields the README lists for a dead letter: the call's own, then reason, tries and
    -- the server that died last holding it.
    f[#f + 1] = 'reason'
    f[#f + 1] = 'delivered ' .. tries .. ' times; each worker died (last: ' .. ARGV[6] .. ')'
    f[#f + 1] = 'tries'
    f[#f + 1] = tostring(tries)
    f[#f + 1] = 'server'
    f[#f + 1] = ARGV[6]
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(f))
    if call ~= '' then
      local rk = ARGV[2] .. call
      redis.call('RPUSH', rk, cmsgpack.pack({ok = false, error = {type = 'DeadLettered',
        message = 'the call was delivered ' .. tries .. ' times and its worker died each time;'
          .. ' it is in the dead-letter stream (`busagent deadletter`)', server = ARGV[6]}}))
      redis.call('EXPIRE', rk, ARGV[3])
    end
    dead = dead + 1
    return
  end
  f[#f + 1] = 'tries'
  f[#f + 1] = tostring(tries)
  redis.call('XADD', target, '*', unpack(f))
  moved = moved + 1
end

local target = {}
for _, a in ipairs(batch) do
  local agent, inbox, record, restore, ids = a[1], KEYS[a[2]], a[3], a[4], a[5]
  target[agent] = inbox
  redis.call('HSET', KEYS[1], agent, record)
  -- A create still waiting in the old inbox builds the agent; otherwise restore it.
  local creating = false
  for _, id in ipairs(ids) do
    local e = redis.call('XRANGE', KEYS[2], id, id)
    if e[1] then
      for i = 1, #e[1][2], 2 do
        if e[1][2][i] == 'kind' and e[1][2][i + 1] == 'create' then creating = true end
      end
    end
  end
  if not creating then
    redis.call('XADD', inbox, '*', unpack(restore))
  end
  for _, id in ipairs(ids) do
    local e = redis.call('XRANGE', KEYS[2], id, id)
    if e[1] then move(id, e[1][2], inbox) end
  end
end
-- Calls that reached the old inbox after the snapshot was taken.
local tail = redis.call('XRANGE', KEYS[2], '(' .. ARGV[7], '+')
for _, e in ipairs(tail) do
  local agent
  for i = 1, #e[2], 2 do
    if e[2][i] == 'agent' then agent = e[2][i + 1] end
  end
  if agent and target[agent] then move(e[1], e[2], target[agent]) end
end
return {moved, dead}
