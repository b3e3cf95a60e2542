-- ferry sweep (expire_due): ends leases whose deadline passed and appends LeaseExpired
-- (kind 10, schema 1) for each to its job's stream and the log.
--
-- KEYS[1]  {ns}:leases
-- ARGV[1]  prefix `{ns}:` (derived keys: lease:<member>, items, jobitems:<job>, log,
--          s:job:<job>)
-- ARGV[2]  max leases to expire
-- A lease expires when deadline < now (store clock); a fenced write is accepted while
-- deadline >= now, so the two never overlap.
-- Returns  a flat array, 6 strings per expired lease: job, step, attempt, agent, token,
--          deadline_ms. The payload is cmsgpack {step, attempt, agent, token}; no `f` field.

local prefix = ARGV[1]
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now), 'LIMIT', 0,
  tonumber(ARGV[2]))
local out = {}
for _, member in ipairs(due) do
  local job, step = split_member(member)
  local lease = prefix .. 'lease:' .. member
  local h = redis.call('HMGET', lease, 'token', 'agent', 'attempt', 'deadline')
  redis.call('DEL', lease)
  redis.call('ZREM', KEYS[1], member)
  if job and h[1] then
    forget_if_idle(prefix, job, member)
    local payload = cmsgpack.pack({step = step, attempt = tonumber(h[3]), agent = h[2],
      token = tonumber(h[1])})
    emit(prefix, 'job:' .. job, '10', '1', int(now), '', payload)
    for _, v in ipairs({job, step, h[3], h[2], h[1], h[4]}) do
      out[#out + 1] = v
    end
  end
end
return out
