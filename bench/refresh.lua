-- wrk driver for POST /auth/refresh: each thread keeps a queue of live refresh tokens.
-- A connection takes the oldest token for its request; the successor in the response goes to the
-- back of the queue. wrk calls response() before the connection's next request(), so the queue
-- never runs dry while every exchange succeeds; a failed exchange loses its chain (counted), and
-- a request with no token left is sent with a placeholder (counted as `starved`). wrk calls
-- request() once more on thread 0 before any connection opens (to check the script) and sends
-- nothing for it: give the file one token more than connections, and thread 0 gets the spare.
-- args: <tokens file, one per line> <wrk threads> [path] [User-Agent]
-- Prints one line at the end: BENCH_JSON {...} (latency in microseconds).

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local nthreads = tonumber(args[2])
  path = args[3] or "/auth/refresh"
  headers = {["Content-Type"] = "application/json", ["User-Agent"] = args[4] or "wrk"}
  queue, head, tail = {}, 1, 0
  local i = 0
  for line in io.lines(args[1]) do
    if line ~= "" then
      if i % nthreads == id then
        tail = tail + 1
        queue[tail] = line
      end
      i = i + 1
    end
  end
  ok, failed, starved = 0, 0, 0
end

function request()
  local token = "none"
  if head <= tail then
    token = queue[head]
    queue[head] = nil
    head = head + 1
  else
    starved = starved + 1
  end
  return wrk.format("POST", path, headers, '{"refresh_token":"' .. token .. '"}')
end

function response(status, hdrs, body)
  if status == 200 then
    local token = string.match(body, '"refresh_token"%s*:%s*"([^"]+)"')
    if token then
      tail = tail + 1
      queue[tail] = token
      ok = ok + 1
      return
    end
  end
  failed = failed + 1
end

function done(summary, latency, requests)
  local n_ok, n_failed, n_starved = 0, 0, 0
  for _, thread in ipairs(threads) do
    n_ok = n_ok + thread:get("ok")
    n_failed = n_failed + thread:get("failed")
    n_starved = n_starved + thread:get("starved")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"ok":%d,"failed":%d,"starved":%d,"duration_us":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,' ..
    '"errors_timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, n_ok, n_failed, n_starved, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
