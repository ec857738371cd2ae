// Asks northstar's flags through posthog-node, as a server would: argv[2] is the base URL,
// argv[3] the project token (a write key), argv[4] a service key (the personal API key for
// local evaluation), the rest distinct ids. Prints, as JSON, each id's
// getAllFlags() and its answers to isFeatureEnabled / getFeatureFlag / getFeatureFlagPayload
// for every flag, and pro_only with the person property plan=pro passed in; exits 1
// if the SDK reports an error. posthog-node also captures `$feature_flag_called` events.
import { PostHog } from 'posthog-node'

const [base, key, personalKey, ...ids] = process.argv.slice(2)
const errors = []
const posthog = new PostHog(key, { host: base, flushAt: 20, flushInterval: 0, fetchRetryCount: 0 })
posthog.on('error', (error) => errors.push(`${error}`))
const answers = {}
for (const id of ids) {
  const all = await posthog.getAllFlags(id)
  const enabled = {}
  const value = {}
  const payload = {}
  for (const flag of Object.keys(all)) {
    enabled[flag] = await posthog.isFeatureEnabled(flag, id)
    value[flag] = await posthog.getFeatureFlag(flag, id)
    payload[flag] = (await posthog.getFeatureFlagPayload(flag, id)) ?? null
  }
  // What the app knows of the person now counts too.
  const asPro = await posthog.getFeatureFlag('pro_only', id, { personProperties: { plan: 'pro' } })
  answers[id] = { all, enabled, value, payload, asPro }
}
await posthog.shutdown()

// A server SDK with a personal API key (a service key) evaluates what it can locally.
const local = new PostHog(key, { host: base, personalApiKey: personalKey, flushAt: 20, flushInterval: 0, fetchRetryCount: 0 })
local.on('error', (error) => errors.push(`local: ${error}`))
if (!(await local.waitForLocalEvaluationReady(10_000))) errors.push('local: definitions never loaded')
const only = { onlyEvaluateLocally: true }
answers.local = {
  proWithPlan: await local.getFeatureFlag('pro_only', 'stranger', { ...only, personProperties: { plan: 'pro' } }),
  proWithout: await local.getFeatureFlag('pro_only', 'stranger', { ...only, personProperties: { plan: 'free' } }),
  everyone: await local.getFeatureFlag('new_ui', 'stranger', only),
  checkoutLocally: (await local.getFeatureFlag('checkout', 'ph-user-1', only)) ?? null,
  checkout: await local.getFeatureFlag('checkout', 'ph-user-1'),
}
await local.shutdown()
if (errors.length > 0) {
  console.error(errors.join('\n'))
  process.exit(1)
}
console.log(JSON.stringify(answers))
