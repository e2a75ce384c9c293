# A Sidekiq 6 app for the end-to-end runbook test: one job that counts its runs
# in a results db the test reads directly (not through the proxy).
require "sidekiq"
require "redis"

def sidekiq_redis_options
  opts = { url: ENV.fetch("REDIS_URL"), reconnect_attempts: 3 }
  ns = ENV["SIDEKIQ_NAMESPACE"].to_s
  opts[:namespace] = ns unless ns.empty?   # Sidekiq 6 + redis-namespace
  opts
end

Sidekiq.configure_server do |config|
  config.redis = sidekiq_redis_options
  Sidekiq.options[:poll_interval_average] = 1
  Sidekiq.options[:average_scheduled_poll_interval] = 1
end

Sidekiq.configure_client do |config|
  config.redis = sidekiq_redis_options
end

RESULTS = Redis.new(url: ENV.fetch("RESULTS_URL"))

class CountJob
  include Sidekiq::Worker
  # No retries: a failing job goes straight to the dead set (so the runbook moves one).
  sidekiq_options retry: 0

  def perform(id)
    RESULTS.hincrby("runs", id, 1)
    raise "planned failure of #{id}" if id.end_with?("7")
  end
end
