-- ferry trim_log: deletes global-log entries older than a time that every consumer group has
-- handled. The log is the coordinators' feed and a copy: every event stays in its own stream.
--
-- KEYS[1]  {ns}:log            KEYS[2] {ns}:log_trimmed
-- ARGV[1]  before ms: entries with an id below `<before>-0` may go
-- The bound is lowered to each group's oldest pending entry and to the entry after its
-- last-delivered one (nothing pending or not yet delivered is ever deleted). `XTRIM MINID ~`
-- deletes whole nodes below the bound (a few older entries may stay until a later call; each
-- call deletes at most 100 nodes' worth). When it deleted something, `log_trimmed` is raised
-- to the bound: from it on the log is complete.
-- Returns  {deleted, bound, holder}: the bound as `ms-seq`, and the name of the group that
--          lowered it below `before` ('' when none did).

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function below(a_ms, a_seq, b_ms, b_seq)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, '0-0', ''}
end
local b_ms, b_seq = tonumber(ARGV[1]), 0
local holder = ''
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do
    info[group[i]] = group[i + 1]
  end
  local ms, seq = parse(info['last-delivered-id'])
  seq = seq + 1
  if below(ms, seq, b_ms, b_seq) then
    b_ms, b_seq, holder = ms, seq, info['name']
  end
  if info['pending'] > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], info['name'])[2]
    ms, seq = parse(oldest)
    if below(ms, seq, b_ms, b_seq) then
      b_ms, b_seq, holder = ms, seq, info['name']
    end
  end
end
local bound = string.format('%d-%d', b_ms, b_seq)
local deleted = redis.call('XTRIM', KEYS[1], 'MINID', '~', bound)
if deleted > 0 then
  local was = redis.call('GET', KEYS[2])
  local w_ms, w_seq = 0, 0
  if was then w_ms, w_seq = parse(was) end
  if below(w_ms, w_seq, b_ms, b_seq) then
    redis.call('SET', KEYS[2], bound)
  end
end
return {deleted, bound, holder}
