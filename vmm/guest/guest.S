/*
 * ferry's micro-VM guest program (x86-64, GNU as, Intel syntax).
 *
 * The VMM enters it in 64-bit long mode at its first byte with RDI = the
 * vCPU index and RSP = that vCPU's stack, interrupts off. The layout
 * symbols (PARAMS, STATUS, P_*, S_*, PORT_*) come from vmm/src/layout.rs
 * through `as --defsym` (see vmm/build.rs); the code is position
 * independent apart from those absolute addresses.
 *
 * Each vCPU owns an even slice of the work area. Every TSC_PER_WRITE ticks
 * it picks a page of its slice (random, sequential or from a hot set),
 * bumps the page's generation in the table (u32 per page) and fills the
 * whole page with the 64-bit value (generation << 32 | page frame number).
 * Between writes, and after each one, it verifies the next page of its
 * slice: every word must be that value (0 for a page never written). A
 * mismatch counts in S_ERRORS, the first one's address goes to
 * S_FIRST_ERROR, and the address is written to PORT_ERROR_LO/HI. On every
 * loop it reads the TSC and keeps the largest gap between two reads in
 * S_MAX_GAP: the longest time it did not run, as the guest sees it.
 */
    .intel_syntax noprefix
    .code64
    .text
    .globl _start
_start:
    /* rbx = this vCPU's status block */
    mov rbx, rdi
    shl rbx, STATUS_SHIFT
    add rbx, STATUS
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
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rbx + S_LAST_TSC], rax
    mov [rbx + S_NEXT_DUE], rax
    mov qword ptr [rbx + S_BOOTED], 1
    mov eax, edi
    mov dx, PORT_BOOT
    out dx, eax

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
    cld
    rep stosq
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
    cld
    repe scasq
    jne 8f
    inc qword ptr [rbx + S_VERIFIED]
    ret
8:
    lea rax, [rdi - 8]
    inc qword ptr [rbx + S_ERRORS]
    cmp qword ptr [rbx + S_FIRST_ERROR], 0
    jne 9f
    mov [rbx + S_FIRST_ERROR], rax
9:
    mov dx, PORT_ERROR_LO
    out dx, eax
    shr rax, 32
    mov dx, PORT_ERROR_HI
    out dx, eax
    ret
