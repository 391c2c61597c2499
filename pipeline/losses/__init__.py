"""Matcher, set criterion (ClsLoss, MaskLoss, CompLoss) and similarity losses (SimLoss, DistLoss)."""
