"""The classic quantizers vqfast replaces, kept as the parity oracle and the benchmark baseline.

They build the full N x K distance matrix (and, for VectorQuantizer, an N x K one-hot), which is
exactly the cost vqfast removes. One defect is fixed here so that parity is well defined: the
original VectorQuantizer permuted the quantized tensor back to [B, C, H, W] before comparing it with
z in [B, H, W, C] layout, so its losses compared mismatched layouts; here the losses are computed
before the permute, in one consistent layout.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SeedVectorQuantizer2(nn.Module):
    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1 / num_embeddings, 1 / num_embeddings)

    def forward(self, z):
        z = z.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]
        z_flattened = z.view(-1, z.shape[-1])
        distances = (
            torch.sum(z_flattened**2, dim=1, keepdim=True)
            + torch.sum(self.embedding.weight**2, dim=1)
            - 2 * torch.matmul(z_flattened, self.embedding.weight.t())
        )
        encoding_indices = torch.argmin(distances, dim=1)
        quantized = self.embedding(encoding_indices).view(z.shape)
        e_latent_loss = F.mse_loss(quantized.detach(), z)
        q_latent_loss = F.mse_loss(quantized, z.detach())
        loss = q_latent_loss + e_latent_loss
        quantized = z + (quantized - z).detach()
        quantized = quantized.permute(0, 3, 1, 2).contiguous()
        return quantized, loss, encoding_indices


class SeedVectorQuantizer(nn.Module):
    def __init__(self, num_embeddings, embedding_dim, beta=0.25):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1 / num_embeddings, 1 / num_embeddings)
        self.beta = beta

    def forward(self, z):
        z = z.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]
        z_flattened = z.view(-1, self.embedding_dim)
        d = (
            torch.sum(z_flattened**2, dim=1, keepdim=True)
            + torch.sum(self.embedding.weight**2, dim=1)
            - 2 * torch.matmul(z_flattened, self.embedding.weight.t())
        )
        encoding_indices = torch.argmin(d, dim=1)
        encodings = torch.zeros(encoding_indices.shape[0], self.num_embeddings, device=z.device)
        encodings.scatter_(1, encoding_indices.unsqueeze(1), 1)  # one-hot
        quantized = torch.matmul(encodings, self.embedding.weight).view(z.shape)  # [B, H, W, C]
        # Fixed: losses in the [B, H, W, C] layout of z, then permute back.
        e_latent_loss = F.mse_loss(quantized.detach(), z)
        q_latent_loss = F.mse_loss(quantized, z.detach())
        loss = q_latent_loss + self.beta * e_latent_loss
        quantized = z + (quantized - z).detach()
        quantized = quantized.permute(0, 3, 1, 2).contiguous()
        return quantized, loss, encoding_indices

    def get_codebook(self):
        return self.embedding.weight.data


class SeedResidualVectorQuantizer(nn.Module):
    def __init__(self, num_quantizers, num_embeddings, embedding_dim, beta=0.25):
        super().__init__()
        self.num_quantizers = num_quantizers
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.quantizers = nn.ModuleList(
            [SeedVectorQuantizer(num_embeddings, embedding_dim, beta) for _ in range(num_quantizers)]
        )

    def forward(self, x):
        quantized = torch.zeros_like(x)
        total_loss = 0
        all_indices = []
        for quantizer in self.quantizers:
            quantized_stage, loss, indices = quantizer(x - quantized)
            quantized = quantized + quantized_stage
            total_loss += loss
            all_indices.append(indices)
        return quantized, total_loss, all_indices


def seed_nearest_codeword(z: torch.Tensor, codebook: torch.Tensor):
    """The classic search as a function (full N x K distances + one-hot gather), for benchmarks."""
    d = torch.sum(z**2, dim=1, keepdim=True) + torch.sum(codebook**2, dim=1) - 2 * torch.matmul(z, codebook.t())
    idx = torch.argmin(d, dim=1)
    one_hot = torch.zeros(idx.shape[0], codebook.shape[0], device=z.device, dtype=codebook.dtype)
    one_hot.scatter_(1, idx.unsqueeze(1), 1)
    return idx, one_hot @ codebook
