// csrc/cuda/highway_gate.cu compiled as C++ on the CPU emulation (emulation.h).
#include "../../csrc/cuda/highway_gate.cu"
