// Sends events through the official Node SDKs (posthog-node, @segment/analytics-node) to the
// northstar at argv[2] with write key argv[3], as a new user would: anonymous activity, then
// identify and alias. Exits 1 if either SDK reports an error. Pinned in package.json.
import { PostHog } from 'posthog-node'
import { Analytics } from '@segment/analytics-node'

const [base, key] = process.argv.slice(2)
const errors = []

const posthog = new PostHog(key, { host: base, flushAt: 20, flushInterval: 0, fetchRetryCount: 2 })
posthog.on('error', (error) => errors.push(`posthog-node: ${error}`))
for (let i = 1; i <= 6; i++) {
  posthog.capture({ distinctId: 'ph-anon-1', event: 'page_viewed', uuid: `0190d5a0-0000-7000-8000-00000000c00${i}` })
}
posthog.identify({ distinctId: 'ph-user-1', properties: { $anon_distinct_id: 'ph-anon-1', plan: 'pro' } })
posthog.alias({ distinctId: 'ph-user-1', alias: 'ph-dev2-1' })
posthog.capture({ distinctId: 'ph-dev2-1', event: 'report_opened', uuid: '0190d5a0-0000-7000-8000-00000000c007' })
await posthog.shutdown()

const segment = new Analytics({ writeKey: key, host: base, flushInterval: 200, maxRetries: 2 })
segment.on('error', (error) => errors.push(`@segment/analytics-node: ${error?.reason ?? error}`))
segment.track({ anonymousId: 'seg-anon-1', event: 'page_viewed', messageId: 'node-seg-1' })
segment.track({ anonymousId: 'seg-anon-1', event: 'page_viewed', messageId: 'node-seg-2' })
segment.identify({ userId: 'seg-user-1', anonymousId: 'seg-anon-1', traits: { plan: 'pro' }, messageId: 'node-seg-3' })
segment.alias({ userId: 'seg-user-1', previousId: 'seg-dev-1', messageId: 'node-seg-4' })
segment.track({ anonymousId: 'seg-dev-1', event: 'report_opened', messageId: 'node-seg-5' })
// Just under maxMessageBytes (32768) as the SDK sends it: stored, not refused for northstar's
// own encoding.
segment.track({ userId: 'seg-user-1', event: 'note_saved', messageId: 'node-seg-6', properties: { text: 'x'.repeat(32_000) } })
await segment.closeAndFlush({ timeout: 20_000 })

if (errors.length > 0) {
  console.log(errors.join('\n'))
  process.exit(1)
}
console.log('sent 15')
