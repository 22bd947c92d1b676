// Stand-in for the CUDA runtime header in the CPU emulation build (see ../cuda_emu.h).
#pragma once
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
