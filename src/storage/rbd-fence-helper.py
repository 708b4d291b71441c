"""
The RBD switch-over fence, kept ready (rbd-fence-helper.ts runs it): one
connected librados client per Ceph cluster and each image held open
read-only, so that at switch-over listing the image's watchers and
blocklisting the ones to fence are a few cluster round trips, not the start
of the `rbd` and `ceph` programs.

Requests and replies are JSON lines, each reply carrying its request's id:
  {"id": 1, "op": "open", "images": [{"key", "conf", "user", "pool", "image"}]}
      -> {"id": 1, "ok": true}
  {"id": 2, "op": "fence", "own": {key: [address, ...]}}
      -> {"id": 2, "ok": true, "fenced": {key: [address, ...]}}
The fence lists each image's watchers anew, so a client that opened it
since is fenced too, and blocklists every one not among its key's own.
A failure answers {"id", "ok": false, "error"}. It exits when its stdin ends,
and dies with its parent.
"""
import ctypes
import json
import os
import signal
import sys
import threading

# Dies with the process that started it, even one killed with SIGKILL, whatever it is waiting on then.
PR_SET_PDEATHSIG = 1
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

import rados  # noqa: E402 (after the death signal: an import that hangs must not outlive the parent either)
import rbd  # noqa: E402

# librados's own bound on each call, in seconds: a cluster that does not answer fails the request rather than hold it.
# The parent's deadline on each request is longer, and kills this process should librados not keep to it.
OP_TIMEOUT_S = sys.argv[1] if len(sys.argv) > 1 else '8'


class Fence:
    def __init__(self):
        self.clusters = {}  # (conf, user) -> rados.Rados
        self.images = {}  # key -> (rados.Rados, rbd.Image)

    def _cluster(self, conf, user):
        cluster = self.clusters.get((conf, user))
        if cluster is None:
            cluster = rados.Rados(conffile=conf, rados_id=user)
            for option in ('client_mount_timeout', 'rados_mon_op_timeout', 'rados_osd_op_timeout'):
                cluster.conf_set(option, OP_TIMEOUT_S)
            cluster.connect()
            self.clusters[(conf, user)] = cluster
        return cluster

    def open(self, images):
        for spec in images:
            cluster = self._cluster(spec['conf'], spec['user'])
            ioctx = cluster.open_ioctx(spec['pool'])
            # Read-only: no watch of its own, so it never shows among the watchers it lists.
            self.images[spec['key']] = (cluster, rbd.Image(ioctx, spec['image'], read_only=True))
        return {}

    def fence(self, own):
        targets = []
        for key, (cluster, image) in self.images.items():
            mine = set(own.get(key, []))
            targets += [(key, cluster, w['addr']) for w in image.watchers_list() if w['addr'] not in mine]
        # All at once: the monitor commits them in one OSD map, where one after the other would wait out its
        # propose interval (a second) between them.
        results = [None] * len(targets)

        def add(i, cluster, address):
            try:
                command = json.dumps({'prefix': 'osd blocklist', 'blocklistop': 'add', 'addr': address})
                ret, _, status = cluster.mon_command(command, b'')
                results[i] = None if ret == 0 else 'osd blocklist add %s: %s (%d)' % (address, status.strip(), ret)
            except Exception as err:  # noqa: BLE001 (reported to the parent, which fails the fence)
                results[i] = 'osd blocklist add %s: %s' % (address, err)

        threads = [threading.Thread(target=add, args=(i, cluster, address)) for i, (_, cluster, address) in enumerate(targets)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        errors = [r for r in results if r is not None]
        if errors:
            raise RuntimeError('; '.join(errors))
        fenced = {}
        for key, _, address in targets:
            fenced.setdefault(key, []).append(address)
        return {'fenced': fenced}

    def handle(self, request):
        op = request.get('op')
        if op == 'open':
            return self.open(request['images'])
        if op == 'fence':
            return self.fence(request['own'])
        raise ValueError('unknown op %r' % op)


def main():
    fence = Fence()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {'id': request['id'], 'ok': True, **fence.handle(request)}
        except Exception as err:  # noqa: BLE001 (every failure goes back as the request's answer)
            reply = {'id': request['id'], 'ok': False, 'error': '%s: %s' % (type(err).__name__, err)}
        sys.stdout.write(json.dumps(reply) + '\n')
        sys.stdout.flush()


main()
# At once: the parent is done with it, and librados's orderly shutdown is not worth waiting for.
os._exit(0)
