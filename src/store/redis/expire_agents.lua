-- ferry expire_agents: removes agents whose heartbeat deadline passed and appends AgentLost
-- (kind 19, schema 1) for each to the `agents` stream and the log, in one atomic step.
--
-- KEYS[1]  {ns}:agents (zset: agent name -> heartbeat deadline ms)
-- KEYS[2]  {ns}:log    KEYS[3] {ns}:s:agents  (written through `emit`, derived from ARGV[1])
-- ARGV[1]  prefix `{ns}:`
-- ARGV[2]  max agents to expire
-- An agent is lost when deadline < now (store clock); `live_agents` counts it live while
-- deadline >= now, so the two never disagree.
-- Returns  the names of the agents expired, oldest deadline first. The payload is cmsgpack
--          {agent, reason = 'heartbeat expired'}; no `f` field.

local prefix = ARGV[1]
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now), 'LIMIT', 0,
  tonumber(ARGV[2]))
for _, agent in ipairs(due) do
  redis.call('ZREM', KEYS[1], agent)
  local payload = cmsgpack.pack({agent = agent, reason = 'heartbeat expired'})
  emit(prefix, 'agents', '19', '1', int(now), '', payload)
end
return due
