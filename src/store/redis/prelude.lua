-- ferry prelude: helpers prepended to every ferry script (see scripts.rs). Not a script itself.
--
-- All derived keys are built from `prefix` (`{ns}:`), so they share the namespace's hash tag
-- with the declared KEYS and every script stays in one Redis Cluster slot.

-- Store-clock milliseconds.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Mirror of `queue_score` in src/store/effects.rs (a test checks they agree): higher priority
-- first, then older enqueue time. Exact in a double.
local function queue_score(priority, ms)
  local p = tonumber(priority)
  if p < -100 then p = -100 elseif p > 100 then p = 100 end
  local cap = 8796093022207 -- 2^43 - 1
  if ms > cap then ms = cap end
  return (100 - p) * 8796093022208 + ms
end

-- A number as an integer string. '%d' formats a C long: no exponent notation (which tostring
-- uses past 1e14) and none of the floating-point formatting that '%.0f' and tostring cost.
-- Scripts format each number once and pass strings to redis.call, which would otherwise
-- format every number argument with '%.14g'.
local function int(n)
  return string.format('%d', n)
end

-- The layout entries are written in: nil until the first `emit` of a script call reads the
-- key `layout` ('fields' while an installation is being upgraded from builds that read only
-- the one-field-each layout; absent = packed).
local entry_layout

-- Appends one event to the global log and to its stream; returns the log id and the stream
-- entry's id. Packed layout: the log entry is `s` (stream name), `h` (header), `p` (payload),
-- the stream entry `h`, `p`, `l` (the log id). The header packs the envelope into one field,
-- `kind|version|at|seq|token` (token empty when there is none): every field costs a script a
-- value to convert, so fewer fields make every XADD and every read cheaper. Under `layout` =
-- 'fields' both entries have one field each (`s`, `k`, `v`, `t`, `n`, `f` only with a token,
-- `p`; `l` in the stream). `seq` is the event's place in its stream (the stream's length after
-- it) as a string; nil reads the stream's length first.
local function emit(prefix, stream, kind, version, at, token, payload, seq)
  local key = prefix .. 's:' .. stream
  if seq == nil then
    seq = int(redis.call('XLEN', key) + 1)
  end
  if entry_layout == nil then
    entry_layout = redis.call('GET', prefix .. 'layout') or 'packed'
  end
  if entry_layout ~= 'fields' then
    local h = kind .. '|' .. version .. '|' .. at .. '|' .. seq .. '|' .. (token or '')
    local id = redis.call('XADD', prefix .. 'log', '*', 's', stream, 'h', h, 'p', payload)
    return id, redis.call('XADD', key, '*', 'h', h, 'p', payload, 'l', id)
  end
  local id
  if token ~= nil and token ~= '' then
    id = redis.call('XADD', prefix .. 'log', '*', 's', stream, 'k', kind, 'v', version, 't', at,
      'n', seq, 'f', token, 'p', payload)
    return id, redis.call('XADD', key, '*', 's', stream, 'k', kind, 'v', version, 't', at,
      'n', seq, 'f', token, 'p', payload, 'l', id)
  end
  id = redis.call('XADD', prefix .. 'log', '*', 's', stream, 'k', kind, 'v', version, 't', at,
    'n', seq, 'p', payload)
  return id, redis.call('XADD', key, '*', 's', stream, 'k', kind, 'v', version, 't', at,
    'n', seq, 'p', payload, 'l', id)
end

-- The queued item of `member`: attempt, priority, pool, as strings; nil when not queued.
local function item_get(prefix, member)
  local v = redis.call('HGET', prefix .. 'items', member)
  if not v then return nil end
  return string.match(v, '^([^|]*)|([^|]*)|(.*)$')
end

-- Removes any queue entry (ready or delayed) of `member`. Every queued member has an item, so
-- a member without one (a leased step, say) has nothing to remove.
local function unqueue(prefix, member)
  local _, _, pool = item_get(prefix, member)
  if not pool then return end
  redis.call('ZREM', prefix .. 'ready:' .. pool, member)
  redis.call('ZREM', prefix .. 'delayed', member)
  redis.call('HDEL', prefix .. 'items', member)
end

local function drop_lease(prefix, member)
  redis.call('DEL', prefix .. 'lease:' .. member)
  redis.call('ZREM', prefix .. 'leases', member)
end

-- Drops `member` from its job's set unless it is still queued or leased.
local function forget_if_idle(prefix, job, member)
  if redis.call('HEXISTS', prefix .. 'items', member) == 0
      and redis.call('EXISTS', prefix .. 'lease:' .. member) == 0 then
    redis.call('SREM', prefix .. 'jobitems:' .. job, member)
  end
end

-- Pushes a wake-up token for `pool`'s waiters. The list stays bounded: past 128 tokens it is
-- trimmed to 64 (so a trim comes once per 64 pushes when nobody waits).
local function wake(prefix, pool)
  local key = prefix .. 'wake:' .. pool
  if redis.call('LPUSH', key, '1') > 128 then
    redis.call('LTRIM', key, 0, 63)
  end
end

-- An ended job (its stream holds a terminal event) never waits or runs again: queueing
-- effects on it are no-ops, as the fold freezes an ended job's steps.
local function ended(prefix, job)
  return redis.call('EXISTS', prefix .. 'ended:' .. job) == 1
end

-- Removes any queue entry and lease of `member`. Every queued or leased member is in its job's
-- `jobitems` set, so a member not in it (a step queued for the first time) has none.
local function clear_member(prefix, job, member)
  if redis.call('SISMEMBER', prefix .. 'jobitems:' .. job, member) == 1 then
    unqueue(prefix, member)
    drop_lease(prefix, member)
  end
end

-- Puts `member` in `pool`'s ready queue (replacing any queue entry or lease it had: a requeued
-- step's old holder is fenced out) and wakes waiters.
local function enqueue(prefix, job, member, attempt, pool, priority, now)
  if ended(prefix, job) then return end
  clear_member(prefix, job, member)
  redis.call('ZADD', prefix .. 'ready:' .. pool, int(queue_score(priority, now)), member)
  redis.call('HSET', prefix .. 'items', member, attempt .. '|' .. priority .. '|' .. pool)
  redis.call('SADD', prefix .. 'jobitems:' .. job, member)
  wake(prefix, pool)
end

-- Puts `member` in the delayed set until `due` (replacing any queue entry or lease it had).
local function schedule(prefix, job, member, attempt, pool, priority, due)
  if ended(prefix, job) then return end
  clear_member(prefix, job, member)
  redis.call('ZADD', prefix .. 'delayed', due, member)
  redis.call('HSET', prefix .. 'items', member, attempt .. '|' .. priority .. '|' .. pool)
  redis.call('SADD', prefix .. 'jobitems:' .. job, member)
end

-- Splits `<job>/<step>`.
local function split_member(member)
  return string.match(member, '^([^/]*)/(.*)$')
end

-- Why `token` is not the live token of the lease at `lease_key`, or nil when it is.
local function lease_problem(lease_key, token, now)
  local h = redis.call('HMGET', lease_key, 'token', 'deadline')
  if not h[1] then
    return 'no live lease'
  end
  if h[1] ~= token then
    return 'the lease is held under token ' .. h[1]
  end
  if tonumber(h[2]) < now then
    return 'the lease ran out'
  end
  return nil
end

-- Checks that `token` is the live token of the lease at `lease_key`; returns an error reply
-- or nil.
local function check_lease(lease_key, token, now)
  local why = lease_problem(lease_key, token, now)
  if why then
    return redis.error_reply('FERRY_STALE ' .. why)
  end
  return nil
end
