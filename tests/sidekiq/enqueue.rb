# Enqueues CountJob continuously (perform_async and perform_in) until STOP_FILE exists.
# Every id is recorded in the results db only once Sidekiq accepted it; a refused
# enqueue is recorded as an error. Runs under Sidekiq 6 (namespaced) or 7 (see jobs.rb).
require_relative "jobs"

tag = ENV.fetch("TAG")
stop = ENV.fetch("STOP_FILE")
n = 0
until File.exist?(stop)
  n += 1
  id = "#{tag}-#{n}"
  begin
    if n % 3 == 0
      CountJob.perform_in(1, id)
    else
      CountJob.perform_async(id)
    end
    RESULTS.call("SADD", "enqueued", id)
  rescue => e
    RESULTS.call("RPUSH", "enqueue_errors", "#{id}: #{e.class}: #{e.message}")
  end
  sleep 0.02
end
