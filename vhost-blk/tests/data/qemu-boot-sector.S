# Assemble: as --32 -o boot.o qemu-boot-sector.S
#           ld -m elf_i386 -Ttext 0x7c00 --oformat binary -e _start -o boot.bin boot.o
# The bytes are embedded in ../qemu_frontend.rs.
# Boot sector for the vhost-blk QEMU test: SeaBIOS loads it through QEMU's
# vhost-user-blk-pci device, i.e. through our daemon. It reads LBA 1-8 with
# INT 13h AH=42h, inverts every byte, writes the result to LBA 16-23 with
# AH=43h, prints the outcome on COM1 and exits QEMU through isa-debug-exit
# (port 0xf4: 0x10 = success, 0x11 = failure).
.code16
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    sti
    mov %dl, drive
    movl $1, dap+8
    mov $0x4200, %ax
    mov drive, %dl
    mov $dap, %si
    int $0x13
    jc fail
    mov $0x8000, %di
    mov $4096, %cx
inv:
    notb (%di)
    inc %di
    loop inv
    movl $16, dap+8
    mov $0x4300, %ax
    mov drive, %dl
    mov $dap, %si
    int $0x13
    jc fail
    mov $msg_ok, %si
    mov $0x10, %bl
    jmp print
fail:
    mov $msg_fail, %si
    mov $0x11, %bl
print:
    mov $0x3f8, %dx
next:
    lodsb
    test %al, %al
    jz done
    out %al, %dx
    jmp next
done:
    mov %bl, %al
    out %al, $0xf4
halt:
    cli
    hlt
    jmp halt
drive:
    .byte 0
    .balign 4
dap:
    .byte 16, 0
    .word 8, 0x8000, 0
    .quad 0
msg_ok:
    .asciz "VHOSTBLK-OK\r\n"
msg_fail:
    .asciz "VHOSTBLK-FAIL\r\n"
    .org 510
    .byte 0x55, 0xaa
