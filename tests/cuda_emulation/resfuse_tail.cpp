// csrc/cuda/resfuse_tail.cu compiled as C++ on the CPU emulation (emulation.h).
#include "../../csrc/cuda/resfuse_tail.cu"
