-- ferry append: M independent appends in one call (group commit). Each append is atomic on its
-- own: its checks run before any of its writes, and a refused append writes nothing. Appends
-- apply in order, so a later one sees an earlier one's writes (two appends to one stream at the
-- same expected version: the second gets a conflict).
--
-- KEYS[1]  {ns}:log              the global log
-- KEYS[2]  {ns}:jobs             job index (zset)
-- ARGV[1]  prefix `{ns}:` (derived keys: s:<stream>, dedupe:<key>, ready:<pool>, delayed,
--          items, jobitems:<job>, ended:<job>, lease:<member>, leases, wake:<pool>,
--          idx:<key>, jobidx:<job>, kept_logs, logs:<job>, agents, stop:<agent>,
--          pause:<agent>)
-- ARGV[2]  M, the number of appends; then M appends, each:
--          stream name (`job:<uuid>`, `webhooks`, `agents`), job id or '' when the stream is
--          not a job's, expected version or -1 for any, fence step or '' for no fence, fence
--          token (also written as field `f`), dedupe window ms, envelope at_ms,
--          D, then D dedupe keys (without the `{ns}:dedupe:` prefix), F, then F dedupe keys to
--          delete once the append is written (same form),
--          N, then N tuples of 9: kind, schema version, payload, effect, step, attempt, pool,
--          priority, delay (for 'schedule': the event's due_ms less the envelope at_ms, ms,
--          possibly negative; due on the store's clock = now + delay); effect is '' | 'enqueue' | 'schedule' | 'finish' | 'clear' |
--          'index' | 'drop_logs' | 'leave' | 'join' | 'stop' | 'pause' | 'resume' (unused tuple
--          fields are ''); for
--          'index' the step field
--          holds the index keys separated by newlines, and the job is added to each set
--          `{ns}:idx:<key>`; keys starting with `live:` are also remembered in
--          `{ns}:jobidx:<job>`, and 'clear' removes the job from those again. The first
--          'clear' of a job also adds it to `{ns}:kept_logs` scored by the envelope at_ms;
--          'drop_logs' deletes `{ns}:logs:<job>` and takes the job out of `kept_logs`;
--          the agent effects (in the `agents` stream; the step field holds the agent's name):
--          'leave' takes the agent out of `{ns}:agents`, the live agents, and deletes
--          `{ns}:stop:<agent>`; 'join' deletes `{ns}:stop:<agent>`; 'stop' sets it to the
--          reason (in the pool field), for the agent's next heartbeat to return; 'pause' sets
--          `{ns}:pause:<agent>` to the reason (pool field) and 'resume' deletes it.
-- Returns  M replies, in order, each one of
--          {'ok', new_version, log_id...} (one log id per event, in order);
--          {'dup', original_log_id} when a dedupe key exists (nothing written);
--          {'conflict', actual_version} when the expected version does not match;
--          {'stale', reason} when the fence token is not the live lease's.
-- Checks run in that order (dedupe, version, fence), all before the append's first write.

local prefix = ARGV[1]
local m = tonumber(ARGV[2])
local now = now_ms()
local replies = {}
local i = 3

for _ = 1, m do
  local stream = ARGV[i]
  local job = ARGV[i + 1]
  local expected = tonumber(ARGV[i + 2])
  local fence_step = ARGV[i + 3]
  local fence_token = ARGV[i + 4]
  local window = ARGV[i + 5]
  local at = ARGV[i + 6]
  local d = tonumber(ARGV[i + 7])
  local dedupe = {}
  for k = 1, d do
    dedupe[k] = prefix .. 'dedupe:' .. ARGV[i + 7 + k]
  end
  i = i + 8 + d
  local f = tonumber(ARGV[i])
  local forget = {}
  for k = 1, f do
    forget[k] = prefix .. 'dedupe:' .. ARGV[i + k]
  end
  i = i + 1 + f
  local n = tonumber(ARGV[i])
  local first = i + 1
  i = first + n * 9

  local reply
  if d > 0 then
    for _, original in ipairs(redis.call('MGET', unpack(dedupe))) do
      if original then
        reply = {'dup', original}
        break
      end
    end
  end

  local stream_key = prefix .. 's:' .. stream
  local len
  if not reply then
    len = redis.call('XLEN', stream_key)
    if expected >= 0 and len ~= expected then
      reply = {'conflict', int(len)}
    end
  end

  local token = ''
  if not reply and fence_step ~= '' then
    local why = lease_problem(prefix .. 'lease:' .. job .. '/' .. fence_step, fence_token, now)
    if why then
      reply = {'stale', why}
    else
      token = fence_token
    end
  end

  if not reply then
    if job ~= '' and len == 0 then
      redis.call('ZADD', KEYS[2], 'NX', now, job)
    end
    reply = {'ok', int(len + n)}
    for e = 0, n - 1 do
      local base = first + e * 9
      local id = emit(prefix, stream, ARGV[base], ARGV[base + 1], at, token, ARGV[base + 2],
        int(len + e + 1))
      reply[#reply + 1] = id
      local effect = ARGV[base + 3]
      if effect ~= '' then
        local step = ARGV[base + 4]
        local member = job .. '/' .. step
        if effect == 'enqueue' then
          enqueue(prefix, job, member, ARGV[base + 5], ARGV[base + 6], ARGV[base + 7], now)
        elseif effect == 'schedule' then
          -- (due: the writer's delay, from the store's clock)
          schedule(prefix, job, member, ARGV[base + 5], ARGV[base + 6], ARGV[base + 7],
            int(now + tonumber(ARGV[base + 8])))
        elseif effect == 'finish' then
          drop_lease(prefix, member)
          -- A member is queued or leased, never both (queueing drops the lease): when this
          -- append passed the step's own fence, there is no queue entry to remove.
          if token == '' or fence_step ~= step then
            unqueue(prefix, member)
          end
          redis.call('SREM', prefix .. 'jobitems:' .. job, member)
        elseif effect == 'index' then
          for key in string.gmatch(ARGV[base + 4], '[^\n]+') do
            redis.call('SADD', prefix .. 'idx:' .. key, job)
            if string.sub(key, 1, 5) == 'live:' then
              redis.call('SADD', prefix .. 'jobidx:' .. job, key)
            end
          end
        elseif effect == 'clear' then
          -- (an empty set does not exist: no DEL needed)
          local set = prefix .. 'jobitems:' .. job
          local members = redis.call('SMEMBERS', set)
          for _, mem in ipairs(members) do
            unqueue(prefix, mem)
            drop_lease(prefix, mem)
          end
          if #members > 0 then redis.call('DEL', set) end
          -- The first end of the job starts its log's retention (scored by this append's
          -- envelope time, the terminal event's at_ms).
          if redis.call('SET', prefix .. 'ended:' .. job, '1', 'NX') then
            redis.call('ZADD', prefix .. 'kept_logs', at, job)
          end
          local idx = prefix .. 'jobidx:' .. job
          local keys = redis.call('SMEMBERS', idx)
          for _, key in ipairs(keys) do
            redis.call('SREM', prefix .. 'idx:' .. key, job)
          end
          if #keys > 0 then redis.call('DEL', idx) end
        elseif effect == 'drop_logs' then
          redis.call('DEL', prefix .. 'logs:' .. job)
          redis.call('ZREM', prefix .. 'kept_logs', job)
        elseif effect == 'leave' then
          -- (for the agent effects the step field holds the agent's name)
          redis.call('ZREM', prefix .. 'agents', ARGV[base + 4])
          redis.call('DEL', prefix .. 'stop:' .. ARGV[base + 4])
        elseif effect == 'join' then
          redis.call('DEL', prefix .. 'stop:' .. ARGV[base + 4])
        elseif effect == 'stop' then
          -- (the pool field holds the reason)
          redis.call('SET', prefix .. 'stop:' .. ARGV[base + 4], ARGV[base + 6])
        elseif effect == 'pause' then
          -- (the pool field holds the reason)
          redis.call('SET', prefix .. 'pause:' .. ARGV[base + 4], ARGV[base + 6])
        elseif effect == 'resume' then
          redis.call('DEL', prefix .. 'pause:' .. ARGV[base + 4])
        end
      end
    end
    for _, key in ipairs(dedupe) do
      redis.call('SET', key, reply[3], 'PX', window)
    end
    if f > 0 then
      redis.call('DEL', unpack(forget))
    end
  end
  replies[#replies + 1] = reply
end

return replies
