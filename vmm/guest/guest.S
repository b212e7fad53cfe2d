/*
 * ferry's micro-VM guest program (x86-64, GNU as, Intel syntax), linked
 * by vmm/build.rs into a PVH ELF (guest.ld: one segment at CODE, plus the
 * Xen PHYS32_ENTRY note), so QEMU (`-kernel guest.elf -append ...`),
 * Cloud Hypervisor, Firecracker and ferry's own VMM boot the same file.
 * The layout symbols (PARAMS, STATUS, P_*, S_*, ...) come from
 * vmm/src/layout.rs through `as --defsym`.
 *
 * Boot (the formats are documented once, in vmm/src/pvh.rs):
 * - the BSP enters at pvh_start in 32-bit protected mode, paging off,
 *   EBX = the physical address of the PVH hvm_start_info. It loads its own
 *   GDT, builds the identity page tables, enters long mode, then reads its
 *   RAM size from start_info's memory map and its parameters from the
 *   command line into PARAMS (validated; a bad one prints a `fatal` line
 *   and halts), clears the generation table (and the work area, unless
 *   `zeroed=1`), copies ap_start..ap_end to TRAMPOLINE (below 1 MiB) and
 *   starts the other vCPUs there with INIT, SIPI, SIPI (all-excluding-self);
 * - an AP starts in real mode at TRAMPOLINE (CS = TRAMPOLINE >> 4), switches
 *   to protected then long mode over the BSP's tables;
 * - each vCPU's index is its initial APIC ID (CPUID 1); one at or above
 *   `vcpus` parks (cli; hlt).
 *
 * Work: each vCPU owns an even slice of the work area. Every
 * TSC_PER_WRITE ticks it picks a page of its slice (random, sequential or
 * from a hot set), bumps the page's generation in the table (u32 per page)
 * and fills the whole page with the 64-bit value (generation << 32 | page
 * frame number). Between writes, and after each one, it verifies the next
 * page of its slice: every word must be that value (0 for a page never
 * written). A mismatch counts in S_ERRORS, the first one's address goes to
 * S_FIRST_ERROR, and an `error` line goes to the report port. On every
 * loop it reads the TSC and keeps the largest gap between two reads in
 * S_MAX_GAP (the time spent writing its own report lines left out): the
 * longest time it did not run, as the guest sees it; S_WINDOW_GAP keeps
 * the same since its last `progress` line. Every `report_ms` it writes a
 * `progress` line with its counters and both gaps, and restarts the
 * window.
 *
 * Output records (COLO's comparison, a real guest's packets): with
 * `output_every=N` (N > 0), after every N-th page write a vCPU stores
 * its record's number (writes / N) in S_OUT_SEQ and its value in
 * S_OUT_VALUE, a mix of its own write counter, RNG and cursor (so two
 * copies of the same VM state emit the same records whatever their
 * timing), then does one 32-bit `out` of (RECORD_TAG << 16 | its index)
 * to OUTPUT_PORT; the VMM reads the record from the status block at that
 * exit (the format is in vmm/src/port.rs). N = 0 (the default): none.
 *
 * Reports are ASCII lines written a byte at a time (`out dx, al`) to the
 * report port, one line at a time (the P_PRINT_LOCK spinlock); the line
 * formats are in vmm/src/port.rs.
 */
    .intel_syntax noprefix

    .set SEL_CODE32, 0x08
    .set SEL_DATA, 0x10
    .set SEL_CODE64, 0x18
    .set START_INFO_MAGIC, 0x336ec578
    .set APIC_SVR, 0xf0
    .set APIC_ICR_LO, 0x300
    .set APIC_ICR_HI, 0x310

/* The Xen ELF note the PVH loaders look for: XEN_ELFNOTE_PHYS32_ENTRY
   (18), its 4-byte descriptor the 32-bit entry's physical address. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long pvh_start

    .text
/* ---- the APs' start, copied to TRAMPOLINE: real mode, CS = TRAMPOLINE >> 4,
   IP = 0; position independent up to ap_end (the far jump and the GDT
   descriptor hold absolute addresses in the program) ---- */
    .code16
    .globl ap_start
ap_start:
    cli
    cld
    mov ax, cs
    mov ds, ax
    lgdt [gdt_desc - ap_start]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    /* ljmpl SEL_CODE32:ap_32 (a 32-bit offset from 16-bit code) */
    .byte 0x66, 0xea
    .long ap_32
    .word SEL_CODE32

    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08 code, 32-bit */
    .quad 0x00cf92000000ffff    /* 0x10 data */
    .quad 0x00af9a000000ffff    /* 0x18 code, 64-bit */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
ap_end:

    .code32
ap_32:
    mov ax, SEL_DATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    xor esi, esi
    jmp enter_long

/* ---- the BSP's PVH entry: 32-bit protected mode, EBX = start_info ---- */
    .globl pvh_start
pvh_start:
    cli
    cld
    lgdt [gdt_desc]
    .byte 0xea
    .long 1f
    .word SEL_CODE32
1:
    mov ax, SEL_DATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov esi, ebx
    /* the identity map: PML4 -> PDPT -> PDS page directories of 2 MiB pages */
    mov edi, PML4
    xor eax, eax
    mov ecx, (PD + PDS * PAGE - PML4) / 4
    rep stosd
    mov dword ptr [PML4], PDPT + 3
    xor ecx, ecx
2:
    lea eax, [ecx * 4]
    shl eax, 10                 /* ecx * PAGE */
    add eax, PD + 3
    mov [PDPT + ecx * 8], eax
    inc ecx
    cmp ecx, PDS
    jb 2b
    xor ecx, ecx
3:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83                /* present, writable, 2 MiB */
    cmp ecx, 3 * 512
    jb 4f
    or eax, 0x18                /* 3..4 GiB (the LAPIC...): uncached */
4:
    mov [PD + ecx * 8], eax
    inc ecx
    cmp ecx, PDS * 512
    jb 3b

/* ESI: start_info (BSP) or 0 (AP) */
enter_long:
    mov eax, cr4
    or eax, 0x620               /* PAE, OSFXSR, OSXMMEXCPT */
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, 0xc0000080         /* EFER */
    rdmsr
    or eax, 0x100               /* LME */
    wrmsr
    mov eax, 0x80050033         /* PG, AM, WP, NE, ET, MP, PE */
    mov cr0, eax
    .byte 0xea
    .long long_64
    .word SEL_CODE64

    .code64
long_64:
    mov eax, 1
    cpuid
    shr ebx, 24                 /* the initial APIC ID: our index */
    test esi, esi
    jz ap_64
    mov rsp, STACKS + PAGE
    push rbx
    call parse_boot
    lea r12, [rip + msg_bsp]
    mov rax, [rsp]
    cmp rax, [PARAMS + P_VCPUS]
    jae fatal
    call start_aps
    pop rdi
    jmp vcpu_main
ap_64:
    mov edi, ebx
    cmp rdi, [PARAMS + P_VCPUS]
    jae park
    lea rsp, [rdi + 1]
    shl rsp, 12
    add rsp, STACKS
    jmp vcpu_main
park:
    cli
    hlt
    jmp park

/* ---- the BSP's boot: parameters from start_info (RSI) ---- */
parse_boot:
    mov qword ptr [PARAMS + P_PORT], DEFAULT_PORT
    lea r12, [rip + msg_magic]
    cmp dword ptr [rsi], START_INFO_MAGIC
    jne fatal
    mov rax, PARAMS_MAGIC
    mov [PARAMS + P_MAGIC], rax
    mov qword ptr [PARAMS + P_VCPUS], 1
    mov qword ptr [PARAMS + P_RATE], 0
    mov qword ptr [PARAMS + P_PATTERN], 0
    mov qword ptr [PARAMS + P_HOT_PCT], 100
    mov qword ptr [PARAMS + P_SEED], 1
    mov qword ptr [PARAMS + P_TSC_KHZ], 0
    mov qword ptr [PARAMS + P_PORT], DEFAULT_PORT
    mov qword ptr [PARAMS + P_REPORT_MS], 1000
    mov qword ptr [PARAMS + P_ZEROED], 0
    mov qword ptr [PARAMS + P_PRINT_LOCK], 0
    mov qword ptr [PARAMS + P_OUTPUT_EVERY], 0
    /* RAM: the end of the memory map's RAM entry (type 1) holding TABLE */
    lea r12, [rip + msg_memmap]
    cmp dword ptr [rsi + 4], 1
    jb fatal
    mov rcx, [rsi + 40]
    mov edx, [rsi + 48]
    xor r8d, r8d
1:
    test edx, edx
    jz 3f
    cmp dword ptr [rcx + 16], 1
    jne 2f
    mov rax, [rcx]
    cmp rax, TABLE
    ja 2f
    add rax, [rcx + 8]
    cmp rax, TABLE
    jbe 2f
    mov r8, rax
2:
    add rcx, 24
    dec edx
    jmp 1b
3:
    test r8, r8
    jz fatal
    mov rax, MAX_MEMORY
    cmp r8, rax
    jbe 4f
    mov r8, rax
4:
    and r8, -(2 << 20)
    mov [PARAMS + P_MEMORY], r8
    /* the command line */
    mov rdi, [rsi + 24]
    test rdi, rdi
    jz 5f
    call parse_cmdline
5:
    /* check and derive */
    lea r12, [rip + msg_vcpus]
    mov rcx, [PARAMS + P_VCPUS]
    test rcx, rcx
    jz fatal
    cmp rcx, MAX_VCPUS
    ja fatal
    lea r12, [rip + msg_pattern]
    mov rax, [PARAMS + P_PATTERN]
    cmp rax, 2
    ja fatal
    jb 6f
    lea r12, [rip + msg_hot]
    mov rax, [PARAMS + P_HOT_PCT]
    test rax, rax
    jz fatal
    cmp rax, 100
    ja fatal
6:
    lea r12, [rip + msg_tsc]
    mov rax, [PARAMS + P_TSC_KHZ]
    test rax, rax
    jz 7f
    cmp rax, 1000
    jb fatal
    cmp rax, 100000000
    ja fatal
7:
    /* work area: after one u32 per page of RAM, 2 MiB aligned */
    mov rax, [PARAMS + P_MEMORY]
    shr rax, 10                 /* / PAGE * 4 */
    add rax, TABLE + (2 << 20) - 1
    and rax, -(2 << 20)
    mov [PARAMS + P_WORK_START], rax
    mov qword ptr [PARAMS + P_TABLE], TABLE
    lea r12, [rip + msg_small]
    mov rdx, [PARAMS + P_MEMORY]
    cmp rax, rdx
    jae fatal
    sub rdx, rax
    shr rdx, 12
    mov [PARAMS + P_WORK_PAGES], rdx
    cmp rdx, [PARAMS + P_VCPUS]
    jb fatal
    /* pacing: TSC ticks per page write of one vCPU =
       tsc_khz * 1000 * PAGE * vcpus / rate, at least 1 */
    xor ecx, ecx
    mov r9, [PARAMS + P_RATE]
    test r9, r9
    jz 8f
    lea r12, [rip + msg_rate]
    mov rax, [PARAMS + P_TSC_KHZ]
    test rax, rax
    jz fatal
    imul rax, rax, 1000 * PAGE
    imul rax, [PARAMS + P_VCPUS]
    xor edx, edx
    div r9
    mov rcx, rax
    test rcx, rcx
    jnz 8f
    mov ecx, 1
8:
    mov [PARAMS + P_TSC_PER_WRITE], rcx
    /* progress lines every report_ms (about a second of a 1 GHz TSC
       without tsc_khz); report_ms=0: none */
    lea r12, [rip + msg_report]
    mov rax, [PARAMS + P_REPORT_MS]
    cmp rax, 3600000
    ja fatal
    mov rcx, [PARAMS + P_TSC_KHZ]
    test rcx, rcx
    jnz 9f
    mov ecx, 1000000
9:
    imul rax, rcx
    mov [PARAMS + P_REPORT_TICKS], rax
    /* a clean generation table, and a clean work area unless RAM is known
       to be zero */
    mov rdi, TABLE
    mov rcx, [PARAMS + P_MEMORY]
    shr rcx, 13                 /* (memory / PAGE * 4) / 8 words */
    xor eax, eax
    rep stosq
    cmp qword ptr [PARAMS + P_ZEROED], 1
    je 10f
    mov rdi, [PARAMS + P_WORK_START]
    mov rcx, [PARAMS + P_WORK_PAGES]
    shl rcx, 9
    rep stosq
10:
    ret

/* Parses the NUL-terminated command line at RDI: words `key=value`,
   separated by spaces (any byte <= ' '); unknown keys and words without
   '=' are skipped; a known key's value is a decimal number with an
   optional K, M or G suffix (binary), stored at PARAMS + the key's
   offset. A bad number is fatal. */
parse_cmdline:
1:
    movzx eax, byte ptr [rdi]
    test al, al
    jz 9f
    cmp al, ' '
    ja 2f
    inc rdi
    jmp 1b
2:
    mov r8, rdi                 /* the word's start */
3:
    movzx eax, byte ptr [rdi]
    cmp al, '='
    je 4f
    cmp al, ' '
    jbe 1b                      /* no '=': skip the word */
    inc rdi
    jmp 3b
4:
    mov r9, rdi
    sub r9, r8                  /* key length */
    inc rdi                     /* the value */
    lea r10, [rip + keys]
5:
    movzx ecx, byte ptr [r10]
    test ecx, ecx
    jz 7f
    cmp rcx, r9
    jne 6f
    mov r11, rdi
    lea rsi, [r10 + 1]
    mov rdi, r8
    repe cmpsb
    mov rdi, r11
    je 8f
    movzx ecx, byte ptr [r10]
6:
    lea r10, [r10 + rcx + 2]
    jmp 5b
7:
    /* an unknown key: skip its value */
    movzx eax, byte ptr [rdi]
    cmp al, ' '
    jbe 1b
    inc rdi
    jmp 7b
8:
    movzx ecx, byte ptr [r10]
    movzx r11d, byte ptr [r10 + rcx + 1]
    call parse_number
    mov [PARAMS + r11], rax
    jmp 1b
9:
    ret

/* RDI: digits, an optional K/M/G, then a separator or NUL; returns the
   value in RAX with RDI past it. Clobbers RCX, RDX. */
parse_number:
    lea r12, [rip + msg_number]
    xor eax, eax
    movzx ecx, byte ptr [rdi]
    sub ecx, '0'
    cmp ecx, 9
    ja fatal                    /* no digit */
1:
    movzx ecx, byte ptr [rdi]
    sub ecx, '0'
    cmp ecx, 9
    ja 2f
    mov rdx, 10
    mul rdx
    jo fatal
    add rax, rcx
    jc fatal
    inc rdi
    jmp 1b
2:
    movzx ecx, byte ptr [rdi]
    or ecx, 0x20                /* lower case */
    xor edx, edx
    cmp ecx, 'k'
    jne 3f
    mov edx, 10
3:
    cmp ecx, 'm'
    jne 4f
    mov edx, 20
4:
    cmp ecx, 'g'
    jne 5f
    mov edx, 30
5:
    test edx, edx
    jz 6f
    inc rdi
    mov ecx, edx
    mov rdx, rax
    shl rax, cl
    mov r10, rax
    shr r10, cl
    cmp r10, rdx
    jne fatal                   /* overflow */
6:
    movzx ecx, byte ptr [rdi]
    cmp ecx, ' '
    ja fatal                    /* junk after the number */
    ret

/* the command line's keys: length, name, offset in PARAMS */
keys:
    .byte 5
    .ascii "vcpus"
    .byte P_VCPUS
    .byte 4
    .ascii "rate"
    .byte P_RATE
    .byte 7
    .ascii "pattern"
    .byte P_PATTERN
    .byte 3
    .ascii "hot"
    .byte P_HOT_PCT
    .byte 4
    .ascii "seed"
    .byte P_SEED
    .byte 7
    .ascii "tsc_khz"
    .byte P_TSC_KHZ
    .byte 4
    .ascii "port"
    .byte P_PORT
    .byte 9
    .ascii "report_ms"
    .byte P_REPORT_MS
    .byte 6
    .ascii "zeroed"
    .byte P_ZEROED
    .byte 12
    .ascii "output_every"
    .byte P_OUTPUT_EVERY
    .byte 0

/* R12: the reason. Prints `ferry fatal <reason>` and halts this vCPU. */
fatal:
    mov rsp, STACKS + PAGE
    lea rsi, [rip + msg_fatal]
    call put_str
    mov rsi, r12
    call put_str
    lea rsi, [rip + msg_nl]
    call put_str
    jmp park

/* ---- starting the APs: INIT, SIPI, SIPI to all but ourselves ---- */
start_aps:
    cmp qword ptr [PARAMS + P_VCPUS], 1
    jbe 9f
    lea rsi, [rip + ap_start]
    mov edi, TRAMPOLINE
    mov ecx, ap_end - ap_start
    rep movsb
    mov ecx, 0x1b               /* IA32_APIC_BASE */
    rdmsr
    and eax, 0xfffff000
    mov r8d, eax
    mov dword ptr [r8 + APIC_SVR], 0x1ff
    mov dword ptr [r8 + APIC_ICR_HI], 0
    mov dword ptr [r8 + APIC_ICR_LO], 0x000c4500   /* INIT, assert */
    call icr_idle
    mov eax, 10000              /* 10 ms */
    call delay_us
    mov ecx, 2
1:
    mov dword ptr [r8 + APIC_ICR_HI], 0
    mov dword ptr [r8 + APIC_ICR_LO], 0x000c4600 | (TRAMPOLINE >> 12)   /* SIPI */
    call icr_idle
    mov eax, 200
    call delay_us
    dec ecx
    jnz 1b
9:
    ret

icr_idle:
    test dword ptr [r8 + APIC_ICR_LO], 0x1000
    jz 1f
    pause
    jmp icr_idle
1:
    ret

/* waits EAX microseconds by the TSC (a 3 GHz one without tsc_khz) */
delay_us:
    push rcx
    mov rcx, [PARAMS + P_TSC_KHZ]
    test rcx, rcx
    jnz 1f
    mov ecx, 3000000
1:
    imul rax, rcx
    xor edx, edx
    mov ecx, 1000
    div rcx
    mov rcx, rax
    rdtsc
    shl rdx, 32
    or rax, rdx
    add rcx, rax
2:
    pause
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, rcx
    jb 2b
    pop rcx
    ret

/* ---- every vCPU: RDI = index, RSP = its stack ---- */
vcpu_main:
    /* rbx = this vCPU's status block */
    mov rbx, rdi
    shl rbx, STATUS_SHIFT
    add rbx, STATUS
    mov [rbx + S_INDEX], rdi
    /* slice = work_pages / vcpus pages from index * slice */
    mov rax, [PARAMS + P_WORK_PAGES]
    xor edx, edx
    div qword ptr [PARAMS + P_VCPUS]
    mov [rbx + S_SLICE_PAGES], rax
    mov rcx, rax
    imul rax, rdi
    mov [rbx + S_SLICE_FIRST], rax
    /* pick_pages = slice, or slice * hot_pct / 100 (at least 1) */
    mov rax, rcx
    cmp qword ptr [PARAMS + P_PATTERN], 2
    jne 1f
    imul rax, [PARAMS + P_HOT_PCT]
    xor edx, edx
    mov ecx, 100
    div rcx
    test rax, rax
    jnz 1f
    mov eax, 1
1:
    mov [rbx + S_PICK_PAGES], rax
    /* xorshift state: seed + index, never zero */
    mov rax, [PARAMS + P_SEED]
    add rax, rdi
    or rax, 1
    mov [rbx + S_RNG], rax
    call lock_print
    lea rsi, [rip + msg_boot]
    call put_str
    mov rax, [rbx + S_INDEX]
    call put_dec
    lea rsi, [rip + msg_nl]
    call put_str
    call unlock_print
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rbx + S_LAST_TSC], rax
    mov [rbx + S_NEXT_DUE], rax
    mov rcx, rax
    add rcx, [PARAMS + P_REPORT_TICKS]
    mov [rbx + S_NEXT_REPORT], rcx
    mov qword ptr [rbx + S_BOOTED], 1

main_loop:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rcx, rax
    sub rcx, [rbx + S_LAST_TSC]
    mov [rbx + S_LAST_TSC], rax
    cmp rcx, [rbx + S_MAX_GAP]
    jbe 1f
    mov [rbx + S_MAX_GAP], rcx
1:
    cmp rcx, [rbx + S_WINDOW_GAP]
    jbe 2f
    mov [rbx + S_WINDOW_GAP], rcx
    mov [rbx + S_WINDOW_GAP_END], rax
2:
    cmp qword ptr [PARAMS + P_REPORT_TICKS], 0
    je 3f
    cmp rax, [rbx + S_NEXT_REPORT]
    jb 3f
    mov rcx, [PARAMS + P_REPORT_TICKS]
    add rcx, rax
    mov [rbx + S_NEXT_REPORT], rcx
    call report_progress
    /* the line's own time is no gap */
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rbx + S_LAST_TSC], rax
3:
    mov rcx, [PARAMS + P_TSC_PER_WRITE]
    test rcx, rcx
    jz do_write
    mov rdx, [rbx + S_NEXT_DUE]
    cmp rax, rdx
    jb idle
    /* due: the next write is one period later, but never bank more than
       64 periods of credit (after a pause, say) */
    add rdx, rcx
    mov r8, rcx
    shl r8, 6
    add r8, rdx
    cmp r8, rax
    jae 2f
    mov rdx, rax
2:
    mov [rbx + S_NEXT_DUE], rdx
do_write:
    call pick_page
    call write_page
    inc qword ptr [rbx + S_WRITES]
    call output_record
    call verify_next
    jmp main_loop
idle:
    call verify_next
    pause
    jmp main_loop

/* rax = index (in the work area) of the page to write next */
pick_page:
    cmp qword ptr [PARAMS + P_PATTERN], 1
    je 3f
    mov rax, [rbx + S_RNG]
    mov rcx, rax
    shl rcx, 13
    xor rax, rcx
    mov rcx, rax
    shr rcx, 7
    xor rax, rcx
    mov rcx, rax
    shl rcx, 17
    xor rax, rcx
    mov [rbx + S_RNG], rax
    xor edx, edx
    div qword ptr [rbx + S_PICK_PAGES]
    mov rax, rdx
    add rax, [rbx + S_SLICE_FIRST]
    ret
3:
    mov rax, [rbx + S_CURSOR]
    lea rcx, [rax + 1]
    cmp rcx, [rbx + S_SLICE_PAGES]
    jb 4f
    xor ecx, ecx
4:
    mov [rbx + S_CURSOR], rcx
    add rax, [rbx + S_SLICE_FIRST]
    ret

/* writes page rax (index in the work area) with its next generation */
write_page:
    mov r9, rax
    mov r10, [PARAMS + P_TABLE]
    mov ecx, [r10 + r9 * 4]
    inc ecx
    jnz 5f
    inc ecx
5:
    mov [r10 + r9 * 4], ecx
    mov rdi, r9
    shl rdi, 12
    add rdi, [PARAMS + P_WORK_START]
    mov rax, rdi
    shr rax, 12
    shl rcx, 32
    or rax, rcx
    mov ecx, 512
    rep stosq
    ret

/* after a write: every output_every-th write, the output record
   {seq = writes / every, value = mix(writes, rng, cursor)} into the
   status block, then one `out` of RECORD_TAG << 16 | index to
   OUTPUT_PORT (port.rs). Clobbers RAX, RCX, RDX, R8. */
output_record:
    mov rcx, [PARAMS + P_OUTPUT_EVERY]
    test rcx, rcx
    jz 1f
    mov rax, [rbx + S_WRITES]
    xor edx, edx
    div rcx
    test rdx, rdx
    jnz 1f
    mov [rbx + S_OUT_SEQ], rax
    /* splitmix64's finaliser over writes ^ rng ^ rotl(cursor, 32) */
    mov rax, [rbx + S_WRITES]
    xor rax, [rbx + S_RNG]
    mov rcx, [rbx + S_CURSOR]
    rol rcx, 32
    xor rax, rcx
    mov rcx, rax
    shr rcx, 30
    xor rax, rcx
    mov r8, 0xbf58476d1ce4e5b9
    imul rax, r8
    mov rcx, rax
    shr rcx, 27
    xor rax, rcx
    mov r8, 0x94d049bb133111eb
    imul rax, r8
    mov rcx, rax
    shr rcx, 31
    xor rax, rcx
    mov [rbx + S_OUT_VALUE], rax
    mov eax, [rbx + S_INDEX]
    or eax, RECORD_TAG << 16
    mov edx, OUTPUT_PORT
    out dx, eax
1:
    ret

/* verifies the page at this vCPU's verify cursor, then advances it */
verify_next:
    mov rax, [rbx + S_VCURSOR]
    lea rcx, [rax + 1]
    cmp rcx, [rbx + S_SLICE_PAGES]
    jb 6f
    xor ecx, ecx
6:
    mov [rbx + S_VCURSOR], rcx
    add rax, [rbx + S_SLICE_FIRST]
    mov r9, rax
    mov r10, [PARAMS + P_TABLE]
    mov ecx, [r10 + r9 * 4]
    mov rdi, r9
    shl rdi, 12
    add rdi, [PARAMS + P_WORK_START]
    xor eax, eax
    test ecx, ecx
    jz 7f
    mov rax, rdi
    shr rax, 12
    shl rcx, 32
    or rax, rcx
7:
    mov ecx, 512
    repe scasq
    jne 8f
    inc qword ptr [rbx + S_VERIFIED]
    ret
8:
    lea r12, [rdi - 8]
    inc qword ptr [rbx + S_ERRORS]
    cmp qword ptr [rbx + S_FIRST_ERROR], 0
    jne 9f
    mov [rbx + S_FIRST_ERROR], r12
9:
    call lock_print
    lea rsi, [rip + msg_error]
    call put_str
    mov rax, [rbx + S_INDEX]
    call put_dec
    lea rsi, [rip + msg_addr]
    call put_str
    mov rax, r12
    call put_hex
    lea rsi, [rip + msg_nl]
    call put_str
    call unlock_print
    /* the line's own time is no gap */
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rbx + S_LAST_TSC], rax
    ret

/* `ferry progress vcpu=N writes=W verified=V errors=E maxgap_ticks=G
   [maxgap_us=U] gap_ticks=g [gap_us=u] gap_end_tsc=T`, then the window's
   gap restarts */
report_progress:
    call lock_print
    lea rsi, [rip + msg_progress]
    call put_str
    mov rax, [rbx + S_INDEX]
    call put_dec
    lea rsi, [rip + msg_writes]
    call put_str
    mov rax, [rbx + S_WRITES]
    call put_dec
    lea rsi, [rip + msg_verified]
    call put_str
    mov rax, [rbx + S_VERIFIED]
    call put_dec
    lea rsi, [rip + msg_errors]
    call put_str
    mov rax, [rbx + S_ERRORS]
    call put_dec
    lea rsi, [rip + msg_gap_ticks]
    call put_str
    mov rax, [rbx + S_MAX_GAP]
    call put_dec
    mov rcx, [PARAMS + P_TSC_KHZ]
    test rcx, rcx
    jz 1f
    lea rsi, [rip + msg_gap_us]
    call put_str
    mov rax, [rbx + S_MAX_GAP]
    mov ecx, 1000
    mul rcx
    div qword ptr [PARAMS + P_TSC_KHZ]
    call put_dec
1:
    lea rsi, [rip + msg_wgap_ticks]
    call put_str
    mov rax, [rbx + S_WINDOW_GAP]
    call put_dec
    mov rcx, [PARAMS + P_TSC_KHZ]
    test rcx, rcx
    jz 2f
    lea rsi, [rip + msg_wgap_us]
    call put_str
    mov rax, [rbx + S_WINDOW_GAP]
    mov ecx, 1000
    mul rcx
    div qword ptr [PARAMS + P_TSC_KHZ]
    call put_dec
2:
    lea rsi, [rip + msg_wgap_end]
    call put_str
    mov rax, [rbx + S_WINDOW_GAP_END]
    call put_dec
    mov qword ptr [rbx + S_WINDOW_GAP], 0
    lea rsi, [rip + msg_nl]
    call put_str
    jmp unlock_print

/* the report lock: one line at a time from all vCPUs */
lock_print:
    mov eax, 1
    xchg eax, [PARAMS + P_PRINT_LOCK]
    test eax, eax
    jz 1f
    pause
    jmp lock_print
1:
    ret

unlock_print:
    mov dword ptr [PARAMS + P_PRINT_LOCK], 0
    ret

/* writes the NUL-terminated string at RSI to the report port; clobbers
   RAX, RDX, RSI */
put_str:
    mov edx, [PARAMS + P_PORT]
1:
    lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:
    ret

/* writes RAX in decimal; clobbers RAX, RCX, RDX, RSI */
put_dec:
    sub rsp, 32
    lea rsi, [rsp + 31]
    mov byte ptr [rsi], 0
    mov ecx, 10
1:
    xor edx, edx
    div rcx
    add dl, '0'
    dec rsi
    mov [rsi], dl
    test rax, rax
    jnz 1b
    call put_str
    add rsp, 32
    ret

/* writes RAX as 0x and hex digits; clobbers RAX, RCX, RDX, RSI */
put_hex:
    sub rsp, 32
    lea rsi, [rsp + 31]
    mov byte ptr [rsi], 0
1:
    mov ecx, eax
    and ecx, 15
    add ecx, '0'
    cmp ecx, '9'
    jbe 2f
    add ecx, 'a' - '9' - 1
2:
    dec rsi
    mov [rsi], cl
    shr rax, 4
    jnz 1b
    dec rsi
    mov byte ptr [rsi], 'x'
    dec rsi
    mov byte ptr [rsi], '0'
    call put_str
    add rsp, 32
    ret

msg_boot:       .asciz "ferry boot vcpu="
msg_progress:   .asciz "ferry progress vcpu="
msg_writes:     .asciz " writes="
msg_verified:   .asciz " verified="
msg_errors:     .asciz " errors="
msg_gap_ticks:  .asciz " maxgap_ticks="
msg_gap_us:     .asciz " maxgap_us="
msg_wgap_ticks: .asciz " gap_ticks="
msg_wgap_us:    .asciz " gap_us="
msg_wgap_end:   .asciz " gap_end_tsc="
msg_error:      .asciz "ferry error vcpu="
msg_addr:       .asciz " addr="
msg_nl:         .asciz "\n"
msg_fatal:      .asciz "ferry fatal "
msg_magic:      .asciz "no PVH start_info (bad magic)"
msg_memmap:     .asciz "no RAM above 1 MiB in the PVH memory map (start_info version 1 needed)"
msg_vcpus:      .asciz "vcpus= must be 1 to 32"
msg_pattern:    .asciz "pattern= must be 0 (random), 1 (sequential) or 2 (hot set)"
msg_hot:        .asciz "hot= must be 1 to 100 (percent)"
msg_tsc:        .asciz "tsc_khz= must be 1000 to 100000000"
msg_small:      .asciz "too little RAM for the table and one work page per vCPU"
msg_rate:       .asciz "rate= needs tsc_khz="
msg_report:     .asciz "report_ms= must be at most 3600000"
msg_number:     .asciz "bad number on the command line"
msg_bsp:        .asciz "the BSP's APIC ID is not below vcpus="
