/**
 * Reaching the leading controller among several (`--controller URL1,URL2,…`,
 * or VMFERRY_CONTROLLER): a request goes to the controller that answered last,
 * then to the others in turn; a standby's VMF_NOT_LEADER is followed to the
 * leader it names (GET /v1/leader). While no controller leads (a standby is
 * taking over from a dead leader) the round is tried again a few times.
 *
 * A controller that is paused (SIGSTOP, a host frozen) or hung still accepts
 * connections, in its kernel, and never answers: a request would wait its
 * whole timeout there (30 s, minutes for an import) before the next URL is
 * tried. So with several URLs each is first asked GET /v1/leader, which a live
 * controller answers at once from memory, within a short bound; one silent
 * that long is passed over. The request itself keeps its own timeout, so a
 * live leader's slow answer (a migration's plan, an import) is not cut short.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { hasCode, VmferryError } from '../errors.ts';
import { requestJson, type RequestOptions } from '../http/errors.ts';
import type { LeadershipStatus } from './leadership.ts';

/** Rounds over every controller while none leads: a takeover lasts about a lease TTL (5 s by default). */
const leaderlessRounds = 5;
const leaderlessGapMs = 2_000;
/** Far beyond a live controller's answer to GET /v1/leader, even on a loaded host; a lease TTL or less. */
const answerProbeMs = 3_000;

/** The controller that answered last, by URL list: the next request starts there. */
const lastAnswered = new Map<string, string>();

/** "URL1,URL2" → its URLs, each an http(s) URL. */
export function parseControllerUrls(text: string, option = '--controller'): string[] {
  const urls = text.split(',').map((u) => u.trim()).filter((u) => u.length > 0);
  if (urls.length === 0) throw new VmferryError('VMF_INVALID_ARGUMENT', `${option} must be one controller URL or several separated by commas (got "${text}")`);
  for (const url of urls) {
    if (!/^https?:\/\/[^,\s]+$/.test(url)) throw new VmferryError('VMF_INVALID_ARGUMENT', `${option}: "${url}" is not an http(s) URL such as http://10.0.0.1:10800`);
  }
  return urls;
}

/** The controller of `urls` that answered last (else the first): where a stream, which any controller serves, is read. */
export function currentController(urls: string): string {
  const list = parseControllerUrls(urls);
  return lastAnswered.get(urls) ?? (list[0] as string);
}

/**
 * `url` of `urls` could not be reached: the next stream is read from the next controller in the list. A stream
 * (readEventStream) does not go through requestController, so without this a leader that died kept being asked.
 */
export function passOver(urls: string, url: string): void {
  const list = parseControllerUrls(urls);
  if (list.length < 2) return;
  lastAnswered.set(urls, list[(list.indexOf(url) + 1) % list.length] as string);
}

/** requestJson to whichever of `urls` (one URL, or several separated by commas) leads. */
export async function requestController<T>(urls: string, method: string, path: string, options: RequestOptions = {}): Promise<T> {
  const list = parseControllerUrls(urls);
  const problems = new Map<string, VmferryError>();
  for (let round = 1; ; round++) {
    const first = lastAnswered.get(urls) ?? list[0];
    const order = [...new Set([first, ...list])].filter((u): u is string => u !== undefined);
    let standbys = 0;
    for (const url of order) {
      const silent = list.length > 1 ? await silence(url, options) : undefined;
      if (silent) {
        problems.set(url, silent);
        continue;
      }
      try {
        const result = await requestJson<T>(url, method, path, options);
        lastAnswered.set(urls, url);
        return result;
      } catch (err) {
        if (!hasCode(err, 'VMF_NOT_LEADER') && !hasCode(err, 'VMF_UNREACHABLE')) throw err;
        problems.set(url, err);
        if (!hasCode(err, 'VMF_NOT_LEADER')) continue;
        standbys++;
        const leader = await requestJson<LeadershipStatus>(url, 'GET', '/v1/leader', { timeoutMs: 5_000, tls: options.tls, server: options.server }).catch(() => undefined);
        if (!leader?.leaderUrl || leader.leaderUrl === url || list.includes(leader.leaderUrl)) continue;
        // A leader outside the list (another address of it): followed once.
        try {
          return await requestJson<T>(leader.leaderUrl, method, path, options);
        } catch (redirectErr) {
          if (!hasCode(redirectErr, 'VMF_NOT_LEADER') && !hasCode(redirectErr, 'VMF_UNREACHABLE')) throw redirectErr;
          problems.set(leader.leaderUrl, redirectErr);
        }
      }
    }
    // Nobody leads right now, but a controller answered: a standby takes over within a lease's time.
    if (standbys === 0 || round >= leaderlessRounds) break;
    await sleep(leaderlessGapMs);
  }
  const errors = [...problems.values()];
  if (errors.length === 1 && errors[0]) throw errors[0];
  const code = errors.some((e) => e.code === 'VMF_NOT_LEADER') ? 'VMF_NOT_LEADER' : 'VMF_UNREACHABLE';
  throw new VmferryError(code, `no controller took ${method} ${path}: ${[...problems].map(([url, err]) => `${url}: ${err.message}`).join('; ')}`);
}

/** Why the controller at `url` did not answer GET /v1/leader within answerProbeMs; undefined when it answered anything, a refusal included. */
async function silence(url: string, options: RequestOptions): Promise<VmferryError | undefined> {
  try {
    await requestJson(url, 'GET', '/v1/leader', { timeoutMs: answerProbeMs, tls: options.tls, server: options.server, ...(options.signal ? { signal: options.signal } : {}) });
    return undefined;
  } catch (err) {
    if (hasCode(err, 'VMF_TIMEOUT')) return new VmferryError('VMF_UNREACHABLE', `${url} accepted the connection but did not answer within ${answerProbeMs} ms (paused or hung)`, { cause: err });
    if (hasCode(err, 'VMF_UNREACHABLE')) return err;
    return undefined;
  }
}
