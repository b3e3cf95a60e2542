-- ferry release: compare-and-release of a step lease; appends StepReleased (kind 22, schema 1)
-- to the job's stream and the log.
--
-- KEYS[1]  {ns}:lease:<job>/<step>    KEYS[2] {ns}:leases
-- ARGV[1]  prefix `{ns}:` (derived keys: items, jobitems:<job>, log, s:job:<job>)
-- ARGV[2]  job id;  ARGV[3] step;  ARGV[4] token;  ARGV[5] reason
-- Returns  the log id of StepReleased. The payload is cmsgpack
--          {step, attempt, agent, token, reason}; the envelope carries `f` = token.
-- Errors   'FERRY_STALE <reason>' unless the lease exists, carries the token and has not
--          run out (a lease that ran out belongs to the sweep).

local prefix = ARGV[1]
local job, step, token = ARGV[2], ARGV[3], ARGV[4]
local member = job .. '/' .. step
local now = now_ms()
local err = check_lease(KEYS[1], token, now)
if err then return err end
local h = redis.call('HMGET', KEYS[1], 'agent', 'attempt')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], member)
forget_if_idle(prefix, job, member)
local payload = cmsgpack.pack({step = step, attempt = tonumber(h[2]), agent = h[1],
  token = tonumber(token), reason = ARGV[5]})
local id = emit(prefix, 'job:' .. job, '22', '1', int(now), token, payload)
return id
