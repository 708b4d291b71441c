/**
 * A libvirt domain definition (`virsh dumpxml`) turned into a vmferry
 * CreateVmRequest. Pure: it reads no files and asks no QEMU; what it needs to
 * know about the cluster comes in the context. Whatever it cannot carry over is
 * returned by name and location with the reason, never dropped silently.
 */
import type { CreateVmRequest } from '../api/agent-types.ts';
import { VmferryError } from '../errors.ts';
import { cpuModelPattern, type NbdServerAddress } from '../qemu/spec.ts';
import { namePattern } from '../util/names.ts';
import { Findings, type NotCarried } from './findings.ts';
import { mapDevices, type MappedDevices } from './libvirt-devices.ts';
import { child, childrenNamed, describe, parseXml, type XmlElement } from './xml-tree.ts';

export type { NotCarried } from './findings.ts';

export interface LibvirtImportContext {
  /** The cluster's storage server: an NBD disk becomes a shared disk only when its export is there. */
  storage: NbdServerAddress;
  /** Machine types the QEMU that will run the VM knows (`-machine help`); undefined when none could be asked. */
  machines?: readonly string[];
  /** The VM's name in vmferry, instead of the domain's <name>. */
  name?: string;
  /** How the input is named in error messages (a file name). */
  source?: string;
}

export interface LibvirtImport {
  request: CreateVmRequest;
  /** What the VM will lack or have differently, each with why. */
  notCarried: NotCarried[];
  /** Harmless defaults vmferry has its own version of. */
  ignored: string[];
}

const MiB = 1024 * 1024;
const minMemoryMiB = 16;
const maxMemoryMiB = 1024 * 1024;
const maxVcpus = 64;

/** Top-level elements with no effect on the guest. */
const ignoredTop: Record<string, string> = {
  metadata: 'notes for libvirt and its tools',
  title: 'a label for people',
  description: 'a label for people',
  resource: 'libvirt\'s cgroup partition',
  seclabel: 'libvirt\'s host-side security label (sVirt)',
  pm: 'QEMU\'s defaults for guest suspend',
};

/** Top-level elements vmferry does not carry, with what the user should know. */
const topReasons: Record<string, string> = {
  uuid: 'vmferry does not set the SMBIOS UUID: the guest sees a new one (software keyed on it, such as some licences, may notice)',
  genid: 'vmferry VMs have no VM generation ID device',
  maxMemory: 'memory hotplug is not supported: the VM gets a fixed amount of memory',
  vcpus: 'vCPU hotplug is not supported: every vCPU is online from the start',
  cputune: 'vmferry does not pin, weigh or cap vCPUs',
  numatune: 'vmferry does not place guest memory on host NUMA nodes',
  memtune: 'vmferry sets no memory limits on the QEMU process',
  blkiotune: 'vmferry sets no block I/O weights',
  iothreads: 'vmferry runs disk I/O in QEMU\'s main loop, without I/O threads',
  iothreadids: 'vmferry runs disk I/O in QEMU\'s main loop, without I/O threads',
  sysinfo: 'vmferry sets no SMBIOS strings: the guest sees QEMU\'s defaults',
  idmap: 'user namespace mappings are for containers',
  keywrap: 'vmferry sets no s390 key wrapping',
  launchSecurity: 'a confidential VM (SEV, TDX) cannot be migrated by vmferry',
  perf: 'vmferry collects no perf events',
  'qemu:commandline': 'extra QEMU arguments are not carried',
  'qemu:capabilities': 'QEMU capability overrides are not carried',
};

const defaultLifecycle: Record<string, string> = { on_poweroff: 'destroy', on_reboot: 'restart', on_crash: 'destroy' };

function invalid(problem: string): never {
  throw new VmferryError('VMF_INVALID_ARGUMENT', problem);
}

/** libvirt's scaled integers: no unit is KiB; k/KiB are powers of 1024, KB and the like powers of 1000. */
export function libvirtBytes(value: string, unit: string | undefined, what: string): number {
  const number = Number(value);
  if (value === '' || !Number.isInteger(number) || number < 0) invalid(`${what} must be a whole number (got '${value}')`);
  const scale = unitScale(unit ?? 'KiB');
  if (scale === undefined) invalid(`${what} has a unit libvirt does not define: '${unit}'`);
  return number * scale;
}

function unitScale(unit: string): number | undefined {
  if (unit === 'b' || unit === 'bytes') return 1;
  const match = /^([kmgtpe])(ib|b)?$/i.exec(unit);
  if (!match) return undefined;
  const power = 'kmgtpe'.indexOf((match[1] as string).toLowerCase()) + 1;
  return (match[2]?.toLowerCase() === 'b' ? 1000 : 1024) ** power;
}

function mapMemory(domain: XmlElement, findings: Findings): number {
  const memory = child(domain, 'memory');
  if (!memory) invalid(`${domain.path} has no <memory>: say how much memory the VM has`);
  const bytes = libvirtBytes(memory.text, memory.attrs.unit, `${memory.path}`);
  const memoryMiB = Math.ceil(bytes / MiB);
  if (memoryMiB < minMemoryMiB || memoryMiB > maxMemoryMiB) invalid(`${memory.path} is ${memoryMiB} MiB; vmferry runs VMs of ${minMemoryMiB} MiB to ${maxMemoryMiB} MiB`);
  if (bytes % MiB !== 0) findings.drop(memory, `vmferry sizes memory in whole MiB: the guest gets ${memoryMiB} MiB`, `memory ${memory.text} ${memory.attrs.unit ?? 'KiB'}`);
  const current = child(domain, 'currentMemory');
  if (current) {
    const currentBytes = libvirtBytes(current.text, current.attrs.unit, current.path);
    if (currentBytes < bytes) findings.drop(current, `the balloon target is not carried: the guest gets all ${memoryMiB} MiB`, `currentMemory ${current.text} ${current.attrs.unit ?? 'KiB'}`);
  }
  return memoryMiB;
}

function mapVcpus(domain: XmlElement, findings: Findings): number {
  const vcpu = child(domain, 'vcpu');
  if (!vcpu) return 1;
  const count = Number(vcpu.text);
  if (!Number.isInteger(count) || count < 1) invalid(`${vcpu.path} must be a positive whole number (got '${vcpu.text}')`);
  if (count > maxVcpus) invalid(`${vcpu.path} is ${count}; vmferry runs VMs of at most ${maxVcpus} vCPUs`);
  const current = vcpu.attrs.current === undefined ? count : Number(vcpu.attrs.current);
  if (current < count) findings.drop(vcpu, `vCPU hotplug is not supported: all ${count} vCPUs are online from the start`, `vcpu current='${vcpu.attrs.current}'`);
  if (vcpu.attrs.cpuset !== undefined) findings.drop(vcpu, 'vmferry does not pin vCPUs to host CPUs', `vcpu cpuset='${vcpu.attrs.cpuset}'`);
  return count;
}

/**
 * The machine stays what the guest was installed on, under its versioned name when this QEMU knows it
 * (the guest keeps the exact chipset): q35 stays q35 and i440FX (`pc`) stays i440FX, since Windows
 * re-detects its hardware on a new chipset and interface names that follow the PCI path change.
 */
function mapMachine(type: XmlElement | undefined, machines: readonly string[] | undefined, findings: Findings): string {
  const machine = type?.attrs.machine;
  if (type === undefined || machine === undefined || machine === 'q35') return 'q35';
  if (machine === 'pc') return 'pc';
  const family = machine.startsWith('pc-q35-') ? 'q35' : machine.startsWith('pc-') ? 'pc' : undefined;
  if (family === undefined) {
    findings.drop(type, 'vmferry runs q35 and i440FX (pc) PC machines; the guest sees a Q35 PC', `machine type '${machine}'`);
    return 'q35';
  }
  if (machines?.includes(machine)) return machine;
  const why = machines === undefined ? 'no QEMU here could be asked whether it knows it' : 'this QEMU does not know it';
  findings.drop(type, `${why}; the VM gets QEMU's current ${family} machine, a slightly different chipset version`, `machine type '${machine}'`);
  return family;
}

function mapCpu(cpu: XmlElement | undefined, findings: Findings): string | undefined {
  if (!cpu) return undefined;
  const mode = cpu.attrs.mode ?? 'custom';
  if (mode === 'host-passthrough' || mode === 'host-model' || mode === 'maximum') {
    findings.drop(
      cpu,
      `'${mode}' means "whatever this host's CPU offers", which another host may not have, so it cannot be migrated by name: vmferry uses its default model; name one every host can run with --cpu MODEL`,
      `cpu mode='${mode}'`,
    );
    return undefined;
  }
  let model: string | undefined;
  for (const element of cpu.children) {
    if (element.name === 'model') {
      if (cpuModelPattern.test(element.text)) model = element.text;
      else findings.drop(element, 'not a QEMU CPU model name vmferry accepts', `cpu model '${element.text}'`);
    } else if (element.name === 'vendor') {
      findings.ignore(element, 'the model names the vendor', `cpu vendor '${element.text}'`);
    } else if (element.name === 'feature') {
      findings.drop(element, `vmferry runs the model as QEMU defines it, without per-feature changes`, `cpu feature '${element.attrs.name}' (${element.attrs.policy ?? 'require'})`);
    } else if (element.name === 'topology') {
      const topology = Object.entries(element.attrs).map(([k, v]) => `${k}=${v}`).join(' ');
      findings.drop(element, 'vmferry passes only the vCPU count and QEMU chooses the topology', `cpu topology ${topology}`);
    } else if (element.name === 'numa') {
      findings.drop(element, 'vmferry gives the guest a single NUMA node', `cpu ${describe(element)}`);
    } else {
      findings.drop(element, 'vmferry does not set it', `cpu ${describe(element)}`);
    }
  }
  return model;
}

function mapFeatures(features: XmlElement | undefined, findings: Findings): void {
  for (const feature of features?.children ?? []) {
    const on = feature.attrs.state !== 'off';
    if (['acpi', 'apic', 'pae'].includes(feature.name) || (feature.name === 'vmport' && !on) || (feature.name === 'smm' && on)) {
      findings.ignore(feature, 'as in QEMU\'s q35 machine', `feature ${feature.name}${feature.attrs.state ? ` state='${feature.attrs.state}'` : ''}`);
    } else if (feature.name === 'hyperv') {
      findings.drop(feature, 'vmferry does not enable Hyper-V enlightenments: a Windows guest runs without them (slower, but it boots)', 'feature hyperv');
    } else {
      findings.drop(feature, 'vmferry runs QEMU\'s q35 defaults', `feature ${describe(feature)}`);
    }
  }
}

function mapClock(clock: XmlElement | undefined, findings: Findings): void {
  if (!clock) return;
  const offset = clock.attrs.offset ?? 'utc';
  if (offset === 'utc') findings.ignore(clock, 'the RTC runs in UTC, as in vmferry', `clock offset='utc'`);
  else findings.drop(clock, 'vmferry\'s guests keep UTC in their RTC: a guest that expects local time (Windows) shows the wrong time until it synchronises', `clock offset='${offset}'`);
  const timers = childrenNamed(clock, 'timer');
  if (timers.length > 0) {
    findings.ignore(clock, 'QEMU\'s default timers and tick policies apply', `timers ${timers.map((t) => t.attrs.name).join(', ')}`);
  }
}

interface OsSettings {
  machine: string;
  kernel?: { kernel: string; initrd?: string; append?: string };
  bootDevs: XmlElement[];
}

function mapOs(os: XmlElement | undefined, context: LibvirtImportContext, findings: Findings): OsSettings {
  if (!os) invalid('the domain has no <os>: it does not say what machine it is');
  const type = child(os, 'type');
  if (type && type.text !== 'hvm') invalid(`${type.path} is '${type.text}': vmferry runs full virtual machines (hvm) only`);
  const arch = type?.attrs.arch ?? 'x86_64';
  if (arch !== 'x86_64') invalid(`${type?.path ?? os.path} has arch '${arch}': vmferry runs x86_64 virtual machines only`);
  const settings: OsSettings = { machine: mapMachine(type, context.machines, findings), bootDevs: [] };
  const efi = os.attrs.firmware === 'efi';
  if (efi) findings.drop(os, uefiWhy, `os firmware='efi'`);
  for (const element of os.children) {
    switch (element.name) {
      case 'type':
      case 'kernel':
      case 'initrd':
      case 'cmdline':
        break;
      case 'boot':
        settings.bootDevs.push(element);
        break;
      case 'loader':
        findings.drop(element, element.attrs.type === 'pflash' ? uefiWhy : 'vmferry boots QEMU\'s own SeaBIOS, not this firmware', `loader ${element.text}`);
        break;
      case 'nvram':
        findings.drop(element, 'the UEFI variable store (boot entries, Secure Boot keys) is not carried', `nvram ${element.text}`);
        break;
      case 'firmware':
        if (efi) findings.ignore(element, 'hints for choosing UEFI firmware (see firmware=\'efi\' above)', 'firmware');
        else findings.drop(element, uefiWhy);
        break;
      case 'bios':
        findings.ignore(element, 'SeaBIOS\'s defaults apply');
        break;
      case 'bootmenu':
        if (element.attrs.enable === 'yes') findings.drop(element, 'vmferry VMs have no boot menu');
        else findings.ignore(element, 'no boot menu, as in vmferry');
        break;
      case 'smbios':
        findings.drop(element, 'vmferry sets no SMBIOS strings: the guest sees QEMU\'s defaults');
        break;
      default:
        findings.drop(element, 'vmferry does not set it');
    }
  }
  const kernel = child(os, 'kernel')?.text;
  if (kernel !== undefined && kernel !== '') {
    if (!kernel.startsWith('/')) invalid(`${child(os, 'kernel')?.path} must be an absolute path (got '${kernel}')`);
    const initrd = child(os, 'initrd')?.text;
    const append = child(os, 'cmdline')?.text;
    settings.kernel = { kernel, ...(initrd ? { initrd } : {}), ...(append ? { append } : {}) };
  }
  return settings;
}

const uefiWhy = 'vmferry boots with SeaBIOS (BIOS), not UEFI firmware: a guest installed for UEFI will not boot from its disk';

/**
 * What the VM boots: a kernel from <os>, else the first carried disk in the
 * per-device boot order, else in <os><boot dev='hd'>. Boot sources vmferry
 * cannot use (cdrom, network) are reported.
 */
function mapBoot(os: OsSettings, devices: MappedDevices, findings: Findings): CreateVmRequest['boot'] {
  if (os.kernel) return { kind: 'kernel', ...os.kernel };
  const firstDisk = devices.disks[0]?.id;
  let diskId: string | undefined;
  if (devices.bootOrder.length > 0) {
    for (const entry of [...devices.bootOrder].sort((a, b) => a.order - b.order)) {
      if (entry.diskId !== undefined) {
        diskId = entry.diskId;
        break;
      }
      findings.drop(entry.element, 'vmferry boots from a disk it carried or from a kernel; the VM boots from the next one in order', `boot order ${entry.order}: ${describe(entry.element)}`);
    }
  } else {
    // libvirt boots from the first hard disk when <os> names no boot device.
    const bootDevs = os.bootDevs.length > 0 ? os.bootDevs : [undefined];
    for (const boot of bootDevs) {
      const dev = boot?.attrs.dev ?? 'hd';
      if (dev === 'hd' && firstDisk !== undefined) {
        diskId = firstDisk;
        if (devices.firstHardDisk !== firstDisk && boot !== undefined) {
          findings.drop(boot, `the disk it boots (${devices.firstHardDisk}) is not carried: the VM boots from ${firstDisk} instead, which may hold no boot loader`, `boot dev='hd'`);
        }
        break;
      }
      if (boot !== undefined) findings.drop(boot, 'vmferry boots from a disk it carried or from a kernel', `boot dev='${dev}'`);
    }
  }
  if (diskId === undefined) {
    invalid('nothing vmferry can boot: the domain has no <kernel> in <os> and no bootable disk vmferry could carry (check the disks with --dry-run)');
  }
  return { kind: 'disk', diskId };
}

function mapName(domain: XmlElement, context: LibvirtImportContext): string {
  if (context.name !== undefined) {
    if (!namePattern.test(context.name)) invalid(`the VM name '${context.name}' is not valid: 1-63 of a-z, 0-9, '.', '-', '_', starting with a letter or digit`);
    return context.name;
  }
  const name = child(domain, 'name')?.text;
  if (name === undefined || name === '') invalid('the domain has no <name>: give the VM one with --name');
  if (!namePattern.test(name)) invalid(`the domain's name '${name}' is not a valid vmferry VM name (1-63 of a-z, 0-9, '.', '-', '_', starting with a letter or digit): give one with --name`);
  return name;
}

/** Everything at the top of <domain> that mapDomain does not read itself. */
function reportTop(domain: XmlElement, findings: Findings): void {
  const read = new Set(['name', 'memory', 'currentMemory', 'vcpu', 'os', 'cpu', 'features', 'clock', 'devices']);
  for (const element of domain.children) {
    if (read.has(element.name)) continue;
    const note = ignoredTop[element.name];
    if (note !== undefined) findings.ignore(element, note);
    else if (element.name in defaultLifecycle) {
      if (element.text === defaultLifecycle[element.name]) findings.ignore(element, 'QEMU\'s own behaviour', `${element.name} ${element.text}`);
      else findings.drop(element, 'vmferry\'s VMs stop on power-off and reset on reboot', `${element.name} ${element.text}`);
    } else if (element.name === 'memoryBacking') {
      if (element.children.length === 0) findings.ignore(element, 'no options in it');
      for (const option of element.children) findings.drop(option, 'vmferry backs guest memory with ordinary host memory', `memoryBacking ${describe(option)}`);
    } else {
      findings.drop(element, topReasons[element.name] ?? 'vmferry has no equivalent; the VM runs without it');
    }
  }
}

/**
 * Maps a domain definition (`virsh dumpxml` output) to a CreateVmRequest, with
 * what it did not carry. Throws VMF_INVALID_ARGUMENT naming the problem when
 * the input is not well-formed XML, not a domain, or not a VM vmferry can run.
 */
export function fromLibvirtXml(xml: string, context: LibvirtImportContext): LibvirtImport {
  const what = context.source ?? 'the libvirt XML';
  const domain = parseXml(xml, what);
  if (domain.name !== 'domain') invalid(`${what} is a <${domain.name}>, not a libvirt <domain> definition (virsh dumpxml NAME gives one)`);
  const hypervisor = domain.attrs.type;
  if (hypervisor !== undefined && hypervisor !== 'kvm' && hypervisor !== 'qemu') {
    invalid(`${what} describes a '${hypervisor}' domain; vmferry runs QEMU/KVM virtual machines`);
  }
  const findings = new Findings();
  if (hypervisor !== undefined) findings.ignore(domain, 'each vmferry host chooses its accelerator', `domain type='${hypervisor}'`);
  const name = mapName(domain, context);
  const memoryMiB = mapMemory(domain, findings);
  const vcpus = mapVcpus(domain, findings);
  const os = mapOs(child(domain, 'os'), context, findings);
  const cpu = mapCpu(child(domain, 'cpu'), findings);
  mapFeatures(child(domain, 'features'), findings);
  mapClock(child(domain, 'clock'), findings);
  reportTop(domain, findings);
  const devices = mapDevices(child(domain, 'devices'), context.storage, findings);
  const boot = mapBoot(os, devices, findings);
  const request: CreateVmRequest = {
    name,
    vcpus,
    memoryMiB,
    machine: os.machine,
    ...(cpu !== undefined ? { cpu } : {}),
    boot,
    disks: devices.disks,
    ...(devices.nics.length > 0 ? { nics: devices.nics } : {}),
  };
  return { request, notCarried: findings.notCarried, ignored: findings.ignored };
}
