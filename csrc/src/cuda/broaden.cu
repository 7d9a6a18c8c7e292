// The broadening stage on the GPU: the blended correlation of BroadeningStage::apply (broadening.cpp) for many
// rows and planes in one launch, with the kernels the core built on the host in float64 (ops.h).
//
// A block takes 256 output pixels of one (row, plane): it loads the edge-extended input they need,
// [p0 - half, p0 + 256 + half), into shared memory, and each thread sums, node by node in increasing order like the
// CPU, hat_s(i) * sum_{m=-h_s}^{h_s} k_s[m] x[i - m] over the nodes whose hat covers its pixel.
#include "ops.h"

namespace fastspec::cuda {

namespace {

constexpr int kTile = 256;

__global__ void __launch_bounds__(kTile) broaden_kernel(BroadenArgs a) {
    extern __shared__ float xs[];
    const int tiles = (a.n_pixels + kTile - 1) / kTile;
    const int r = int(blockIdx.x / unsigned(tiles)), tile = int(blockIdx.x % unsigned(tiles));
    const BroadenPlane pl = a.planes[blockIdx.y];
    const detail::device_plan::RowRecord rec = a.records[r];
    const int H = rec.half, np = a.n_pixels;
    const int p0 = tile * kTile, i = p0 + threadIdx.x;
    float* dst;
    std::size_t stride;
    if (pl.dst == -1) {
        dst = a.out + std::size_t(r) * np;
        stride = 1;
    } else if (pl.dst == -2) {
        dst = a.jacobian_vmac + std::size_t(r) * np;
        stride = 1;
    } else {
        dst = a.jacobian + std::size_t(r) * np * a.n_labels + pl.dst;
        stride = std::size_t(a.n_labels);
    }
    if (rec.zero & pl.zero_bit) {  // the same for the whole block
        if (i < np) dst[std::size_t(i) * stride] = 0.0f;
        return;
    }
    const float* x = pl.src < 0 ? a.flux + std::size_t(r) * np : a.tangents + (std::size_t(r) * a.nt + pl.src) * np;
    const int span = kTile + 2 * H;
    for (int j = threadIdx.x; j < span; j += blockDim.x) xs[j] = x[min(max(p0 - H + j, 0), np - 1)];
    __syncthreads();
    if (i >= np) return;
    const int taps_n = 2 * H + 1;
    const float* taps = a.taps + rec.taps + std::size_t(pl.which) * a.n_nodes * taps_n;
    const int* node_half = a.node_half + std::size_t(r) * a.n_nodes;
    const float* xc = xs + (i - p0) + H;  // xc[-m] = x[i - m]
    float acc = 0.0f;
    for (int s = 0; s < a.n_nodes; ++s) {
        const int lo = a.node_lo[s], hi = a.node_hi[s];
        if (i < lo || i > hi) continue;
        const int hs = node_half[s];
        const float* k = taps + std::size_t(s) * taps_n + (H - hs);  // k[m + hs], m in [-hs, hs]
        float c = 0.0f;
        for (int m = -hs; m <= hs; ++m) c = fmaf(k[m + hs], xc[-m], c);
        acc = fmaf(a.hat[a.hat_offset[s] + (i - lo)], c, acc);
    }
    dst[std::size_t(i) * stride] = acc;
}

int shared_bytes(int max_half) { return int(sizeof(float)) * (kTile + 2 * max_half); }

}  // namespace

bool broaden_reserve_shared(int max_half, int device_limit_bytes) {
    const int need = shared_bytes(max_half);
    if (need <= 48 * 1024) return true;
    if (need > device_limit_bytes) return false;
    return cudaFuncSetAttribute(broaden_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, need) == cudaSuccess;
}

void launch_broaden(const BroadenArgs& args, std::size_t rows, int max_half, cudaStream_t stream) {
    // x: (row, pixel tile), up to 2^31 - 1 blocks; y: the planes (at most 1 + n_labels).
    const dim3 grid(unsigned((args.n_pixels + kTile - 1) / kTile * rows), unsigned(args.n_planes));
    broaden_kernel<<<grid, kTile, shared_bytes(max_half), stream>>>(args);
}

}  // namespace fastspec::cuda
