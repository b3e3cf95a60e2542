-- ferry logs: appends step output lines to a job's log stream under the step's lease.
--
-- KEYS[1]  {ns}:lease:<job>/<step>    KEYS[2] {ns}:logs:<job>
-- ARGV[1]  fence token;  ARGV[2] max lines kept (XADD MAXLEN ~);  ARGV[3..] payloads
--          (rmp named StepLog), one entry each, field `p`
-- Returns  the number of lines written.
-- Errors   'FERRY_STALE <reason>' unless the lease exists, carries the token and has not run
--          out (nothing written).

local err = check_lease(KEYS[1], ARGV[1], now_ms())
if err then return err end
for i = 3, #ARGV do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'p', ARGV[i])
end
return #ARGV - 2
