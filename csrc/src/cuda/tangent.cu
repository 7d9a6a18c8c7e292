// forward_jacobian's tangents: the unit input tangents and ReLU's derivative mask (ops.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops.h"

namespace fastspec::cuda {

namespace {

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__global__ void unit_tangents_kernel(T* t_in, std::size_t rows, int nt, int input_dim, int latent_dim) {
    const std::size_t count = rows * nt * input_dim, stride = std::size_t(gridDim.x) * blockDim.x;
    for (std::size_t q = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; q < count; q += stride) {
        const std::size_t row = q / input_dim;
        const int col = int(q - row * input_dim), t = int(row % nt);
        t_in[q] = from_float<T>(col == latent_dim + t ? 1.0f : 0.0f);
    }
}

template <class T>
__global__ void relu_mask_kernel(T* t, const T* __restrict__ h, std::size_t rows, int nt, int width) {
    const std::size_t count = rows * nt * width, stride = std::size_t(gridDim.x) * blockDim.x;
    for (std::size_t q = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; q < count; q += stride) {
        const std::size_t row = q / width;  // tangent row r * nt + tt
        const int i = int(q - row * width);
        const std::size_t r = row / nt;
        if (!(to_float(h[r * width + i]) > 0.0f)) t[q] = from_float<T>(0.0f);
    }
}

unsigned grid_for(std::size_t work) {
    const std::size_t blocks = (work + 255) / 256;
    return unsigned(blocks < 65535 * 8 ? (blocks ? blocks : 1) : 65535 * 8);
}

}  // namespace

void launch_unit_tangents(void* t_in, Elem elem, std::size_t rows, int nt, int input_dim, int latent_dim,
                          cudaStream_t stream) {
    const unsigned g = grid_for(rows * nt * input_dim);
    if (elem == Elem::f32)
        unit_tangents_kernel<<<g, 256, 0, stream>>>(static_cast<float*>(t_in), rows, nt, input_dim, latent_dim);
    else if (elem == Elem::f16)
        unit_tangents_kernel<<<g, 256, 0, stream>>>(static_cast<__half*>(t_in), rows, nt, input_dim, latent_dim);
    else
        unit_tangents_kernel<<<g, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(t_in), rows, nt, input_dim, latent_dim);
}

void launch_relu_mask(void* t, const void* h, Elem elem, std::size_t rows, int nt, int width, cudaStream_t stream) {
    const unsigned g = grid_for(rows * nt * width);
    if (elem == Elem::f32)
        relu_mask_kernel<<<g, 256, 0, stream>>>(static_cast<float*>(t), static_cast<const float*>(h), rows, nt, width);
    else if (elem == Elem::f16)
        relu_mask_kernel<<<g, 256, 0, stream>>>(static_cast<__half*>(t), static_cast<const __half*>(h), rows, nt, width);
    else
        relu_mask_kernel<<<g, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(t), static_cast<const __nv_bfloat16*>(h),
                                                 rows, nt, width);
}

}  // namespace fastspec::cuda
