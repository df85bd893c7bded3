/* Entry from the 64-bit boot protocol: long mode, paging on, RSI = boot_params. */
    .section .text.start, "ax"
    .globl _start
_start:
    cli
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi
    call probe_main
1:  hlt
    jmp 1b

/* #BP handler for the int3 test: count and return (RIP already points past int3). */
    .text
    .globl probe_bp_stub
probe_bp_stub:
    incq probe_bp_count(%rip)
    iretq

    .bss
    .balign 16
    .space 16384
stack_top:
