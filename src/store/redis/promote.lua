-- ferry promote (promote_due): moves delayed steps whose due time passed to their ready queue
-- and appends StepQueued (kind 3, schema 1) for each to its job's stream and the log.
--
-- KEYS[1]  {ns}:delayed    KEYS[2] {ns}:items
-- ARGV[1]  prefix `{ns}:` (derived keys: ready:<pool>, jobitems:<job>, wake:<pool>,
--          log, s:job:<job>)
-- ARGV[2]  max steps to promote
-- A step is due when due_ms <= now (store clock). Its ready score is queue_score(priority, now).
-- Returns  the number of steps promoted. The payload is cmsgpack {step, attempt, pool,
--          priority}; every promotion LPUSHes the pool's wake list.

local prefix = ARGV[1]
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0,
  tonumber(ARGV[2]))
local promoted = 0
for _, member in ipairs(due) do
  local job, step = split_member(member)
  local attempt, priority, pool = item_get(prefix, member)
  local attempt_n, priority_n = tonumber(attempt), tonumber(priority)
  if job and attempt_n and priority_n then
    enqueue(prefix, job, member, attempt, pool, priority, now)
    local payload = cmsgpack.pack({step = step, attempt = attempt_n, pool = pool,
      priority = priority_n})
    emit(prefix, 'job:' .. job, '3', '1', int(now), '', payload)
    promoted = promoted + 1
  else
    -- a delayed member without a well-formed item cannot be queued: drop it rather than loop on it
    redis.call('ZREM', KEYS[1], member)
  end
end
return promoted
