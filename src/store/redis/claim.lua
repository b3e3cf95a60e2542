-- ferry claim: pops the best ready step over some pools, grants a lease with a fresh fencing
-- token and appends StepClaimed (kind 4, schema 1) to the job's stream and the log.
--
-- KEYS[1]  {ns}:items    KEYS[2] {ns}:leases    KEYS[3] {ns}:fence
-- ARGV[1]  prefix `{ns}:` (derived keys: ready:<pool>, lease:<member>, jobitems:<job>, log,
--          s:job:<job>)
-- ARGV[2]  agent id;  ARGV[3] lease ttl ms
-- ARGV[4..] pool names
-- Picks the lowest (score, member) head across the pools' ready zsets (priority, then enqueue
-- time; ties by member).
-- Returns  nil when every pool is empty, else
--          {job, step, attempt, pool, token, deadline_ms} (all strings).
-- The StepClaimed payload is cmsgpack {step, attempt, agent, token, lease_ttl_ms}; the
-- envelope carries `f` = the new token.
-- Errors   'FERRY_CORRUPT <reason>' when a ready member has no item (nothing written).

local prefix = ARGV[1]
local agent = ARGV[2]
local ttl = tonumber(ARGV[3])

local best, best_score, best_pool
for i = 4, #ARGV do
  local head = redis.call('ZRANGE', prefix .. 'ready:' .. ARGV[i], 0, 0, 'WITHSCORES')
  if head[1] then
    local score = tonumber(head[2])
    if best == nil or score < best_score or (score == best_score and head[1] < best) then
      best, best_score, best_pool = head[1], score, ARGV[i]
    end
  end
end
if best == nil then
  return nil
end

local attempt, _, item_pool = item_get(prefix, best)
local job, step = split_member(best)
if attempt == nil or job == nil then
  return redis.error_reply('FERRY_CORRUPT ready member ' .. best .. ' has no queue item')
end

redis.call('ZREM', prefix .. 'ready:' .. best_pool, best)
redis.call('HDEL', KEYS[1], best)
local now = now_ms()
local token = redis.call('INCR', KEYS[3])
local deadline = now + ttl
redis.call('HSET', prefix .. 'lease:' .. best, 'token', token, 'agent', agent,
  'attempt', attempt, 'deadline', int(deadline), 'pool', item_pool)
redis.call('ZADD', KEYS[2], int(deadline), best)
redis.call('SADD', prefix .. 'jobitems:' .. job, best)

local payload = cmsgpack.pack({step = step, attempt = attempt, agent = agent, token = token,
  lease_ttl_ms = ttl})
emit(prefix, 'job:' .. job, 4, 1, int(now), tostring(token), payload)

return {job, step, tostring(attempt), item_pool, tostring(token), int(deadline)}
