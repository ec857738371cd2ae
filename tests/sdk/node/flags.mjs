// Asks northstar's flags through posthog-node, as a server would: argv[2] is the base URL,
// argv[3] the project token (a write key), the rest distinct ids. Prints, as JSON, each id's
// getAllFlags() and its answers to isFeatureEnabled / getFeatureFlag for every flag; exits 1
// if the SDK reports an error. posthog-node also captures `$feature_flag_called` events.
import { PostHog } from 'posthog-node'

const [base, key, ...ids] = process.argv.slice(2)
const errors = []
const posthog = new PostHog(key, { host: base, flushAt: 20, flushInterval: 0, fetchRetryCount: 0 })
posthog.on('error', (error) => errors.push(`${error}`))
const answers = {}
for (const id of ids) {
  const all = await posthog.getAllFlags(id)
  const enabled = {}
  const value = {}
  for (const flag of Object.keys(all)) {
    enabled[flag] = await posthog.isFeatureEnabled(flag, id)
    value[flag] = await posthog.getFeatureFlag(flag, id)
  }
  answers[id] = { all, enabled, value }
}
await posthog.shutdown()
if (errors.length > 0) {
  console.error(errors.join('\n'))
  process.exit(1)
}
console.log(JSON.stringify(answers))
