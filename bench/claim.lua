-- wrk script: POST /api/v1/annotations/queue with a fresh key per request.
--
-- Environment (set by bench/run.sh, bench/flat.sh, bench/rss.sh):
--   BENCH_KEYFILE  one key per line (line i = bench.keys.i)
--   BENCH_QUEUE    the queue id
--   BENCH_THREADS  wrk's -t (each thread takes its own contiguous slice)
--   BENCH_IDS      if set, thread N writes "<item id> <version>" of every
--                  200 it reads to BENCH_IDS.N (bench_check_module in
--                  bench/lib.sh compares them with the database)
--   BENCH_KEYS_END what a thread does when its slice runs out: "wrap"
--                  (default: start again, counted as reused, an invalid
--                  run) or "stop" (the thread stops: bench/rss.sh)
--
-- setup() runs in wrk's main Lua state once per thread, before that
-- thread's init(); thread:set() puts the slice bounds into the thread's own
-- state, so the two threads never share a key.  Each thread walks its slice
-- once; a key is never sent twice in a run unless the slice runs out, which
-- is counted (reused) and makes bench/run.sh mark the run invalid.
--
-- done() runs in the main state and prints machine-readable lines for
-- bench/run.sh:  BENCH <name> <value>

local keyfile  = os.getenv("BENCH_KEYFILE")
local queue    = os.getenv("BENCH_QUEUE")
local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
local idsfile  = os.getenv("BENCH_IDS")
local keys_end = os.getenv("BENCH_KEYS_END") or "wrap"

-- main state ---------------------------------------------------------------

local threads = {}

function setup(thread)
   local n = #threads
   table.insert(threads, thread)
   thread:set("tid", n)
   thread:set("nthreads", nthreads)
end

-- thread state -------------------------------------------------------------

-- globals of the thread state, read by done() through thread:get()
keys, nkeys, pos, used, reused, first, last = nil, 0, 0, 0, 0, 0, 0
recorded, unparsed, stopped = 0, 0, 0
counts = {}
local body, ids

function init(args)
   local total = 0
   for _ in io.lines(keyfile) do total = total + 1 end
   local slice = math.floor(total / nthreads)
   first = tid * slice + 1
   last  = first + slice - 1
   keys = {}
   local i = 0
   for line in io.lines(keyfile) do
      i = i + 1
      if i > last then break end
      if i >= first then keys[#keys + 1] = line end
   end
   nkeys  = #keys
   pos    = 0
   used   = 0
   reused = 0
   body   = '{"queue_id":"' .. queue .. '"}'
   if idsfile then
      ids = assert(io.open(idsfile .. "." .. tid, "w"))
      ids:setvbuf("full")   -- flushed by the C library when wrk exits
   end
   wrk.method = "POST"
   wrk.path   = "/api/v1/annotations/queue"
   wrk.body   = body
end

function request()
   pos = pos + 1
   if pos > nkeys then
      if keys_end == "stop" then
         -- the request returned now may still be written: without a key
         -- it is a 401 that touches no item
         if stopped == 0 then
            stopped = 1
            wrk.thread:stop()
         end
         return wrk.format(nil, nil, { ["Content-Type"] = "application/json" }, nil)
      end
      pos = 1
   end
   used = used + 1
   if used > nkeys then
      reused = reused + 1
   end
   return wrk.format(nil, nil,
                     { ["Authorization"] = "Bearer " .. keys[pos],
                       ["Content-Type"]  = "application/json" }, nil)
end

function response(status, headers, body)
   if stopped ~= 0 then
      return   -- the key-less request after the stop, if it is answered
   end
   counts[status] = (counts[status] or 0) + 1
   if ids and status == 200 then
      local id, version = body:match(
         '^{"success":true,"item":{"id":"([0-9a-f-]+)".-,"version":(%d+),"claimed_at":"')
      if id then
         ids:write(id, " ", version, "\n")
         recorded = recorded + 1
      else
         unparsed = unparsed + 1
      end
   end
end

-- main state, after the run ---------------------------------------------

function done(summary, latency, requests)
   local status = {}
   local reused, used, recorded, unparsed, stopped = 0, 0, 0, 0, 0
   for i, t in ipairs(threads) do
      local f, l = t:get("first"), t:get("last")
      local u, r = t:get("used"), t:get("reused")
      local c = t:get("counts")
      io.write(string.format("BENCH thread%d_keys %d-%d used=%d\n",
                             i - 1, f or -1, l or -1, u or -1))
      used = used + (u or 0)
      recorded = recorded + (t:get("recorded") or 0)
      unparsed = unparsed + (t:get("unparsed") or 0)
      stopped = stopped + (t:get("stopped") or 0)
      reused = reused + (r or 0)
      for s, n in pairs(c or {}) do
         status[s] = (status[s] or 0) + n
      end
   end
   io.write(string.format("BENCH requests %d\n", summary.requests))
   io.write(string.format("BENCH duration_us %d\n", summary.duration))
   io.write(string.format("BENCH p50_us %d\n", latency:percentile(50)))
   io.write(string.format("BENCH p99_us %d\n", latency:percentile(99)))
   io.write(string.format("BENCH sent %d\n", used))
   io.write(string.format("BENCH reused %d\n", reused))
   io.write(string.format("BENCH recorded %d\n", recorded))
   io.write(string.format("BENCH unparsed %d\n", unparsed))
   io.write(string.format("BENCH stopped_threads %d\n", stopped))
   local e = summary.errors
   io.write(string.format("BENCH socket_errors %d\n",
                          e.connect + e.read + e.write + e.timeout))
   io.write(string.format("BENCH socket_detail connect=%d read=%d write=%d timeout=%d\n",
                          e.connect, e.read, e.write, e.timeout))
   local s200, non200, list = 0, 0, {}
   for s, n in pairs(status) do
      if s == 200 then s200 = n else non200 = non200 + n end
      list[#list + 1] = s .. "=" .. n
   end
   table.sort(list)
   io.write(string.format("BENCH status_200 %d\n", s200))
   io.write(string.format("BENCH non200 %d\n", non200))
   io.write("BENCH statuses " .. table.concat(list, ",") .. "\n")
end
