/**
 * How many migrations one host drain may run at once, checked by the API and by the CLI before it asks. More at
 * once only splits the same budget thinner, and each runs a destination QEMU.
 */
export const maxDrainParallel = 16;
