"""The QEMU lab (``vmbusify lab up --qemu``): real Linux guests with no NIC, reached over one
virtio-serial port.

Modules: ``image`` (the Debian guest image, built once and cached in /var/cache/vmbusify-lab,
with the guest .deb installed offline; the per-VM config disk), ``accel`` (KVM if a guest
really boots under it, probed and cached; TCG otherwise), ``vm`` (one guest's QEMU: command
line, start, stop, readiness). ``lab/lab.py`` puts them together with the external network
and the host stack, which are the namespace lab's.
"""
