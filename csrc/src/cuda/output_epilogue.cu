// The elementwise work around the products: sigmoid and the output transform of the last layer, in
// forward_jacobian the sigmoid's derivative applied to the tangents, and a bias(+ReLU)/conversion kernel (ops.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops.h"

namespace fastspec::cuda {

namespace {

__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

__global__ void sigmoid_output_kernel(const float* __restrict__ logits, std::size_t count, float scale, float offset,
                                      float* dst, float* const* dst_slot) {
    float* y = dst ? dst : *dst_slot;
    const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
    // Four at a time where the buffers allow (both are 16-byte aligned at the start of a chunk when n_pixels % 4 == 0;
    // the tail and unaligned cases run one at a time).
    const bool vec = (reinterpret_cast<std::uintptr_t>(y) % 16 == 0) && (reinterpret_cast<std::uintptr_t>(logits) % 16 == 0);
    std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (vec) {
        const std::size_t n4 = count / 4;
        for (std::size_t q = i; q < n4; q += stride) {
            const float4 a = reinterpret_cast<const float4*>(logits)[q];
            float4 o;
            o.x = scale * sigmoid(a.x) + offset;
            o.y = scale * sigmoid(a.y) + offset;
            o.z = scale * sigmoid(a.z) + offset;
            o.w = scale * sigmoid(a.w) + offset;
            reinterpret_cast<float4*>(y)[q] = o;
        }
        for (std::size_t q = n4 * 4 + i; q < count; q += stride) y[q] = scale * sigmoid(logits[q]) + offset;
    } else {
        for (std::size_t q = i; q < count; q += stride) y[q] = scale * sigmoid(logits[q]) + offset;
    }
}

__global__ void jacobian_output_kernel(const float* __restrict__ logits, float* tangents,
                                       const float* __restrict__ tangent_scale, std::size_t rows, std::size_t n_pixels,
                                       int n_labels, NetworkLabels net, float scale, float offset, bool broadening,
                                       float* flux_dst, float* const* slots) {
    const std::size_t count = rows * n_pixels, stride = std::size_t(gridDim.x) * blockDim.x;
    float* flux = broadening ? flux_dst : slots[0];
    float* jac = broadening ? nullptr : slots[1];
    for (std::size_t q = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; q < count; q += stride) {
        const std::size_t r = q / n_pixels, p = q - r * n_pixels;
        const float s = sigmoid(logits[q]);
        flux[q] = scale * s + offset;
        const float g = scale * s * (1.0f - s);
        if (broadening) {
            for (int t = 0; t < net.n; ++t) {
                const std::size_t at = (r * net.n + t) * n_pixels + p;
                tangents[at] = g * tangents[at] * tangent_scale[r * net.n + t];
            }
        } else {
            float* jp = jac + q * n_labels;
            for (int j = 0; j < n_labels; ++j) jp[j] = 0.0f;
            for (int t = 0; t < net.n; ++t)
                jp[net.label[t]] = g * tangents[(r * net.n + t) * n_pixels + p] * tangent_scale[r * net.n + t];
        }
    }
}

__device__ __forceinline__ float load_f(const float* p, std::size_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __half* p, std::size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, std::size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store_f(float* p, std::size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(__half* p, std::size_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, std::size_t i, float v) { p[i] = __float2bfloat16_rn(v); }

template <class X, class Y>
__global__ void bias_act_kernel(const X* x, Y* y, const float* __restrict__ bias, std::size_t count, int width,
                                bool relu) {
    const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
    for (std::size_t q = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; q < count; q += stride) {
        float v = load_f(x, q);
        if (bias) v += bias[q % std::size_t(width)];
        if (relu) v = v > 0.0f ? v : 0.0f;
        store_f(y, q, v);
    }
}

unsigned grid_for(std::size_t work, int threads) {
    const std::size_t blocks = (work + threads - 1) / threads;
    return unsigned(blocks < 65535 * 8 ? (blocks ? blocks : 1) : 65535 * 8);  // grid-stride loops cover the rest
}

}  // namespace

void launch_sigmoid_output(const float* logits, std::size_t rows, std::size_t n_pixels, float scale, float offset,
                           float* dst, float* const* dst_slot, cudaStream_t stream) {
    const std::size_t count = rows * n_pixels;
    sigmoid_output_kernel<<<grid_for((count + 3) / 4, 256), 256, 0, stream>>>(logits, count, scale, offset, dst,
                                                                               dst_slot);
}

void launch_jacobian_output(const float* logits, float* tangents, const float* tangent_scale, std::size_t rows,
                            std::size_t n_pixels, int n_labels, const NetworkLabels& net, float scale, float offset,
                            bool broadening, float* flux_dst, float* const* slots, cudaStream_t stream) {
    jacobian_output_kernel<<<grid_for(rows * n_pixels, 256), 256, 0, stream>>>(
        logits, tangents, tangent_scale, rows, n_pixels, n_labels, net, scale, offset, broadening, flux_dst, slots);
}

void launch_bias_act(const void* x, Elem x_elem, void* y, Elem y_elem, const float* bias, std::size_t cols, int width,
                     bool relu, cudaStream_t stream) {
    const std::size_t count = cols * std::size_t(width);
    const unsigned g = grid_for(count, 256);
    auto go = [&](auto* typed_y) {
        if (x_elem == Elem::f32)
            bias_act_kernel<<<g, 256, 0, stream>>>(static_cast<const float*>(x), typed_y, bias, count, width, relu);
        else if (x_elem == Elem::f16)
            bias_act_kernel<<<g, 256, 0, stream>>>(static_cast<const __half*>(x), typed_y, bias, count, width, relu);
        else
            bias_act_kernel<<<g, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), typed_y, bias, count, width,
                                                   relu);
    };
    if (y_elem == Elem::f32)
        go(static_cast<float*>(y));
    else if (y_elem == Elem::f16)
        go(static_cast<__half*>(y));
    else
        go(static_cast<__nv_bfloat16*>(y));
}

}  // namespace fastspec::cuda
