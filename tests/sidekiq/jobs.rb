# The app of the end-to-end runbook test, for both Sidekiq versions the runbook has side by side:
#   - Sidekiq 6.4 (Debian's ruby-sidekiq) with redis-namespace: SIDEKIQ_NAMESPACE=sidekiq;
#   - Sidekiq 7.3 (GEM_HOME/GEM_PATH = the gem home .ci/run fills from ../shared/gems): no
#     namespace (Sidekiq 7 has none), RESP3 through redis-client.
# One job that counts its runs in a results db the test reads directly (not through the proxy).
require "sidekiq"

SIDEKIQ7 = Sidekiq::VERSION.start_with?("7.")

if SIDEKIQ7
  require "redis_client"
else
  require "redis"
end

def sidekiq_redis_options
  opts = { url: ENV.fetch("REDIS_URL"), reconnect_attempts: 3 }
  ns = ENV["SIDEKIQ_NAMESPACE"].to_s
  unless ns.empty?
    abort "Sidekiq #{Sidekiq::VERSION} has no namespaces" if SIDEKIQ7
    opts[:namespace] = ns   # Sidekiq 6 + redis-namespace
  end
  opts
end

Sidekiq.configure_server do |config|
  config.redis = sidekiq_redis_options
  if SIDEKIQ7
    config[:poll_interval_average] = 1
    config.average_scheduled_poll_interval = 1
  else
    Sidekiq.options[:poll_interval_average] = 1
    Sidekiq.options[:average_scheduled_poll_interval] = 1
  end
end

Sidekiq.configure_client do |config|
  config.redis = sidekiq_redis_options
end

# The results db, straight to Redis: redis-rb under Sidekiq 6, redis-client under Sidekiq 7
# (the isolated gem home has no redis-rb). One connection behind a lock: Sidekiq runs jobs in threads.
class Results
  def initialize(url)
    @lock = Mutex.new
    @conn = SIDEKIQ7 ? RedisClient.config(url: url, reconnect_attempts: 3).new_client : Redis.new(url: url)
  end

  def call(*args)
    @lock.synchronize { @conn.call(*args) }
  end
end

RESULTS = Results.new(ENV.fetch("RESULTS_URL"))

# Records which Sidekiq ran it (runs:6 / runs:7) and how often each id ran.
# Ids ending in 3 fail on their first run and succeed on their retry; ids ending in 7 always
# fail (one retry, then the dead set). Retries come after 1 s plus Sidekiq's jitter (0-9 s),
# so the retry set of the old keyspace holds jobs when `migrate` runs.
class CountJob
  include Sidekiq::Job
  sidekiq_options retry: 1
  sidekiq_retry_in { |_count, _exc| 1 }

  def perform(id)
    runs = RESULTS.call("HINCRBY", "runs", id, 1)
    RESULTS.call("HINCRBY", "runs:#{Sidekiq::VERSION[0]}", id, 1)
    raise "planned failure of #{id}" if id.end_with?("7") || (id.end_with?("3") && runs == 1)
    RESULTS.call("HINCRBY", "done", id, 1)
  end
end
