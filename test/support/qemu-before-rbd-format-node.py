#!/usr/bin/python3
"""
QEMU as agents before the raw format node over RBD clients started it
(command-line.ts): the device's node `disk-ID` is the rbd node itself. Takes
today's arguments, folds each raw node over an rbd node into that rbd node
under the raw node's name, and execs qemu-system-x86_64 with the rest as is.
"""
import json
import os
import sys

args = sys.argv[1:]
blockdevs = {i + 1: json.loads(args[i + 1]) for i, arg in enumerate(args) if arg == '-blockdev'}
by_name = {node['node-name']: (i, node) for i, node in blockdevs.items()}
dropped = set()
for i, node in blockdevs.items():
    child = by_name.get(node.get('file')) if node['driver'] == 'raw' else None
    if child is None or child[1]['driver'] != 'rbd':
        continue
    child_index, client = child
    args[i] = json.dumps({**client, 'node-name': node['node-name']})
    dropped.update({child_index - 1, child_index})
args = [arg for i, arg in enumerate(args) if i not in dropped]
os.execvp('qemu-system-x86_64', ['qemu-system-x86_64', *args])
