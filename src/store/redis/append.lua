-- ferry append: atomic append of events to a stream and the global log, with dedupe, expected
-- version and fencing checks, applying the live-structure effects of each event.
--
-- KEYS[1]  {ns}:s:<stream>       the stream
-- KEYS[2]  {ns}:log              the global log
-- KEYS[3]  {ns}:jobs             job index (zset)
-- KEYS[4..] {ns}:dedupe:<key>    dedupe keys (any number)
-- ARGV[1]  prefix `{ns}:` (derived keys: ready:<pool>, delayed, items, jobitems:<job>,
--          ended:<job>, lease:<member>, leases, pools, wake:<pool>)
-- ARGV[2]  stream name (`job:<uuid>`, `webhooks`, `agents`)
-- ARGV[3]  job id, or '' when the stream is not a job's
-- ARGV[4]  expected version, or -1 for any
-- ARGV[5]  fence step, or '' for no fence;  ARGV[6] fence token (also written as field `f`)
-- ARGV[7]  dedupe window ms;  ARGV[8] envelope at_ms;  ARGV[9] number of events N
-- ARGV[10..] N tuples of 9: kind, schema version, payload, effect, step, attempt, pool,
--          priority, due_ms; effect is '' | 'enqueue' | 'schedule' | 'finish' | 'clear' |
--          'index' (unused tuple fields are ''); for 'index' the step field holds the index
--          keys separated by newlines, and the job is added to each set `{ns}:idx:<key>`;
--          keys starting with `live:` are also remembered in `{ns}:jobidx:<job>`, and 'clear'
--          removes the job from those again.
-- Returns  {'ok', new_version, log_id...} (one log id per event, in order), or
--          {'dup', original_log_id} when a dedupe key exists (nothing written).
-- Errors   'FERRY_CONFLICT <actual version>' when the expected version does not match;
--          'FERRY_STALE <reason>' when the fence token is not the live lease's.
-- Checks run in that order (dedupe, version, fence) and all before any write.

local prefix = ARGV[1]
local stream = ARGV[2]
local job = ARGV[3]
local expected = tonumber(ARGV[4])
local fence_step = ARGV[5]
local fence_token = ARGV[6]
local window = ARGV[7]
local at = ARGV[8]
local n = tonumber(ARGV[9])

for i = 4, #KEYS do
  local original = redis.call('GET', KEYS[i])
  if original then
    return {'dup', original}
  end
end

local len = redis.call('XLEN', KEYS[1])
if expected >= 0 and len ~= expected then
  return redis.error_reply('FERRY_CONFLICT ' .. len)
end

local now = now_ms()
local token = ''
if fence_step ~= '' then
  local err = check_lease(prefix .. 'lease:' .. job .. '/' .. fence_step, fence_token, now)
  if err then return err end
  token = fence_token
end

if job ~= '' and len == 0 then
  redis.call('ZADD', KEYS[3], 'NX', now, job)
end

local out = {'ok', tostring(len + n)}
for e = 0, n - 1 do
  local base = 10 + e * 9
  local id = emit(prefix, stream, ARGV[base], ARGV[base + 1], at, token, ARGV[base + 2])
  out[#out + 1] = id
  local effect = ARGV[base + 3]
  if effect ~= '' then
    local step = ARGV[base + 4]
    local member = job .. '/' .. step
    if effect == 'enqueue' then
      enqueue(prefix, job, member, ARGV[base + 5], ARGV[base + 6], ARGV[base + 7], now)
    elseif effect == 'schedule' then
      schedule(prefix, job, member, ARGV[base + 5], ARGV[base + 6], ARGV[base + 7], ARGV[base + 8])
    elseif effect == 'finish' then
      drop_lease(prefix, member)
      unqueue(prefix, member)
      redis.call('SREM', prefix .. 'jobitems:' .. job, member)
    elseif effect == 'index' then
      for key in string.gmatch(ARGV[base + 4], '[^\n]+') do
        redis.call('SADD', prefix .. 'idx:' .. key, job)
        if string.sub(key, 1, 5) == 'live:' then
          redis.call('SADD', prefix .. 'jobidx:' .. job, key)
        end
      end
    elseif effect == 'clear' then
      local set = prefix .. 'jobitems:' .. job
      for _, m in ipairs(redis.call('SMEMBERS', set)) do
        unqueue(prefix, m)
        drop_lease(prefix, m)
      end
      redis.call('DEL', set)
      redis.call('SET', prefix .. 'ended:' .. job, '1')
      local idx = prefix .. 'jobidx:' .. job
      for _, key in ipairs(redis.call('SMEMBERS', idx)) do
        redis.call('SREM', prefix .. 'idx:' .. key, job)
      end
      redis.call('DEL', idx)
    end
  end
end

for i = 4, #KEYS do
  redis.call('SET', KEYS[i], out[3], 'PX', window)
end

return out
