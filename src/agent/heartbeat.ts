/**
 * Tells the controller every few seconds that this agent is alive and where it
 * is; with several controllers (`--controller URL1,URL2`), every one of them,
 * so whichever leads (or takes over) knows the host is alive.
 */
import type { Logger } from 'pino';
import { describeError } from '../errors.ts';
import { requestJson } from '../http/errors.ts';
import type { TlsIdentity } from '../security/tls-files.ts';

export const heartbeatIntervalMs = 3_000;

/** What an agent tells the controller about its host (HostRecord in src/store/store.ts, less lastSeen). */
export interface HeartbeatHost {
  id: string;
  url: string;
  address: string;
  accelerator?: 'kvm' | 'tcg';
  acceleratorReason?: string;
}

/** tls: the agent's identity; the controller accepts a heartbeat only for the host its certificate names. */
export function startHeartbeat(controllerUrls: readonly string[], host: HeartbeatHost, logger: Logger, tls?: TlsIdentity): () => void {
  const stops = controllerUrls.map((url) => startOne(url, host, logger, tls));
  return () => {
    for (const stop of stops) stop();
  };
}

function startOne(controllerUrl: string, host: HeartbeatHost, logger: Logger, tls?: TlsIdentity): () => void {
  let failing = false;
  const beat = (): void => {
    requestJson(controllerUrl, 'POST', '/v1/hosts/heartbeat', { body: host, timeoutMs: 2_000, tls, server: { role: 'controller' } }).then(
      () => {
        if (failing) logger.info(`controller ${controllerUrl} reachable again`);
        failing = false;
      },
      (err: unknown) => {
        // Logged once per outage, not every beat.
        if (!failing) logger.warn({ err: describeError(err) }, `cannot reach controller ${controllerUrl}`);
        failing = true;
      },
    );
  };
  beat();
  const timer = setInterval(beat, heartbeatIntervalMs);
  return () => clearInterval(timer);
}
