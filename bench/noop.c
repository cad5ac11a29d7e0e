/*
 * bench/noop.c
 *		The benchmark's no-op step: a process that exits 0 at once.
 *
 * Built without the C library (-static -nostdlib), so that running it costs
 * only what every step costs the agent: a fork, an exec and an exit.
 * /bin/true is dynamically linked, and on a virtual machine the C
 * library's start-up (the dynamic loader, and the CPU feature probing that
 * traps to the hypervisor) costs about ten times the exec itself; with it,
 * the benchmark measures glibc instead of restart_worker.  bench/run falls
 * back to /bin/true on other architectures (BENCH_STEP chooses).
 */
void		_start(void);

/*
 * The entry point the kernel jumps to: the exit system call, status 0.
 */
void
_start(void)
{
#if defined(__x86_64__)
	__asm__ volatile("mov $60, %%eax\n\txor %%edi, %%edi\n\tsyscall" ::: "memory");
#elif defined(__aarch64__)
	__asm__ volatile("mov x8, #93\n\tmov x0, #0\n\tsvc #0" ::: "memory");
#else
#error "bench/noop.c: unsupported architecture"
#endif
	for (;;)
		;
}
