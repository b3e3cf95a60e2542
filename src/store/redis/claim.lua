-- ferry claim: pops up to `max` of the best ready steps over some pools, one at a time; grants
-- each a lease with a fresh fencing token and appends StepClaimed (kind 4, schema 1) to its
-- job's stream and the log.
--
-- KEYS[1]  {ns}:items    KEYS[2] {ns}:leases    KEYS[3] {ns}:fence
-- ARGV[1]  prefix `{ns}:` (derived keys: ready:<pool>, lease:<member>, log,
--          s:job:<job>)
-- ARGV[2]  agent id;  ARGV[3] lease ttl ms;  ARGV[4] max claims (>= 1)
-- ARGV[5..] pool names
-- Each claim picks the lowest (score, member) head across the pools' ready zsets (priority,
-- then enqueue time; ties by member).
-- Returns  a list of claims, empty when every pool is empty; each claim is
--          {job, step, attempt, pool, token, deadline_ms, claimed_id}: strings, the last the
--          StepClaimed entry's id in the job's stream. The script does not read the job's
--          stream: the adapter reads it up to `claimed_id` with the server's own XRANGE, one
--          pipeline for all claims of a call (a script pays for every value it reads and
--          returns, several times what XRANGE itself costs, and a long stream would hold the
--          server).
-- The StepClaimed payload is cmsgpack {step, attempt, agent, token, lease_ttl_ms}; the
-- envelope carries `f` = the new token.
-- Errors   'FERRY_CORRUPT <reason>' when the first ready member has no item (nothing
--          written); a later one ends the list early and fails the next call.

local prefix = ARGV[1]
local agent = ARGV[2]
local ttl = tonumber(ARGV[3])
local max = tonumber(ARGV[4])
local now = now_ms()
local claims = {}

for _ = 1, max do
  local best, best_score, best_pool
  -- One pool: pop its head at once (ZPOPMIN orders by score, then member, as below).
  local popped = #ARGV == 5
  if popped then
    local head = redis.call('ZPOPMIN', prefix .. 'ready:' .. ARGV[5])
    if head[1] then
      best, best_score, best_pool = head[1], head[2], ARGV[5]
    end
  else
    for i = 5, #ARGV do
      local head = redis.call('ZRANGE', prefix .. 'ready:' .. ARGV[i], 0, 0, 'WITHSCORES')
      if head[1] then
        local score = tonumber(head[2])
        if best == nil or score < best_score or (score == best_score and head[1] < best) then
          best, best_score, best_pool = head[1], score, ARGV[i]
        end
      end
    end
  end
  if best == nil then
    break
  end

  local attempt, _, item_pool = item_get(prefix, best)
  local attempt_n = tonumber(attempt)
  local job, step = split_member(best)
  if attempt_n == nil or job == nil then
    if popped then
      -- put it back: a refused claim writes nothing
      redis.call('ZADD', prefix .. 'ready:' .. best_pool, best_score, best)
    end
    if #claims > 0 then break end
    return redis.error_reply('FERRY_CORRUPT ready member ' .. best .. ' has no queue item')
  end

  if not popped then
    redis.call('ZREM', prefix .. 'ready:' .. best_pool, best)
  end
  redis.call('HDEL', KEYS[1], best)
  local token = redis.call('INCR', KEYS[3])
  -- every number is formatted once (see int)
  local fence, deadline = int(token), int(now + ttl)
  redis.call('HSET', prefix .. 'lease:' .. best, 'token', fence, 'agent', agent,
    'attempt', attempt, 'deadline', deadline, 'pool', item_pool)
  redis.call('ZADD', KEYS[2], deadline, best)
  -- `best` stays in its job's `jobitems` set: it was queued, now it is leased.

  local payload = cmsgpack.pack({step = step, attempt = attempt_n, agent = agent, token = token,
    lease_ttl_ms = ttl})
  local stream = 'job:' .. job
  local at = int(now)
  local _, entry_id = emit(prefix, stream, '4', '1', at, fence, payload, nil)
  claims[#claims + 1] = {job, step, attempt, item_pool, fence, deadline, entry_id}
end

return claims
