package dev.edgelm.demo;

import com.getcapacitor.BridgeActivity;

public class MainActivity extends BridgeActivity {}
